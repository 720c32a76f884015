"""The public Refocuser: shapes and intensity units through normalisation, padding, resampling and cropping, the
constant-frame rule, and a clear InputError / WeightsError for every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig, OpticsConfig, UNetModelConfig
from acquire_refocus.errors import ConfigError, InputError, WeightsError
from acquire_refocus.model.checkpoint import save_weights
from acquire_refocus.model.network import build_network


@pytest.fixture(scope="module")
def identity_refocuser(tmp_path_factory: pytest.TempPathFactory) -> Refocuser:
    """A network whose residual head is zero: its image output equals its input, so everything around the network
    (normalisation, padding, resampling, cropping, denormalisation) must give the frame back."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = UNetModelConfig(base_channels=4, depth=3)
    network = build_network(config)
    torch.nn.init.zeros_(network.to_image.weight)
    torch.nn.init.zeros_(network.to_image.bias)
    path = tmp_path_factory.mktemp("identity") / "identity.pt"
    save_weights(path, network, config, OpticsConfig(), {"purpose": "identity test network"})
    return Refocuser.load(path, engine="torch")


@pytest.mark.parametrize("shape", [(64, 64), (65, 97), (131, 64), (300, 257)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_output_has_the_frame_shape_and_intensity_units(
    identity_refocuser: Refocuser, shape: tuple[int, int], dtype: type
) -> None:
    rng = np.random.default_rng(sum(shape))
    top = 250 if dtype == np.uint8 else 5000
    frame = (rng.random(shape) * top + 3).astype(dtype)
    out = identity_refocuser(frame)
    assert out.image.shape == shape and out.image.dtype == np.float32
    np.testing.assert_allclose(out.image, frame.astype(np.float64), rtol=1e-5, atol=1e-3 * top)
    assert isinstance(out.defocus_um, float) and np.isfinite(out.defocus_um)
    assert 0.0 <= out.confidence <= 1.0


def test_other_pixel_size_is_resampled_and_back_to_the_exact_shape(identity_refocuser: Refocuser) -> None:
    yy, xx = np.mgrid[0:150, 0:211]
    frame = (1000 + 400 * np.sin(xx / 13.0) * np.cos(yy / 17.0)).astype(np.float32)  # smooth: survives resampling
    for factor in (0.5, 1.7):
        out = identity_refocuser(frame, pixel_size_um=identity_refocuser.pixel_size_um * factor)
        assert out.image.shape == frame.shape
        inner = (slice(8, -8), slice(8, -8))
        assert np.abs(out.image[inner] - frame[inner]).max() < 0.05 * 400


def test_pixel_size_within_one_percent_is_not_resampled(identity_refocuser: Refocuser) -> None:
    frame = np.random.default_rng(1).random((64, 80)).astype(np.float32)
    same = identity_refocuser(frame).image
    nearly = identity_refocuser(frame, pixel_size_um=identity_refocuser.pixel_size_um * 1.005).image
    np.testing.assert_array_equal(same, nearly)


@pytest.mark.parametrize("value", [0, 7, 65535])
def test_constant_frame_comes_back_unchanged_with_zero_confidence(tiny_refocuser: Refocuser, value: int) -> None:
    frame = np.full((64, 70), value, dtype=np.uint16)
    out = tiny_refocuser(frame)
    assert out.image.dtype == np.float32
    np.testing.assert_array_equal(out.image, frame.astype(np.float32))
    assert out.defocus_um == 0.0 and out.confidence == 0.0


def test_properties(tiny_refocuser: Refocuser) -> None:
    assert tiny_refocuser.engine_name == "torch"
    assert tiny_refocuser.pixel_size_um == pytest.approx(OpticsConfig().pixel_size_um)
    assert len(tiny_refocuser.model_sha256) == 64


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((2, 64, 64), np.uint16), "2-D"),
        (np.zeros(4096, np.uint16), "2-D"),
        (np.zeros((1, 64, 64), np.uint16), "squeeze"),
        (np.zeros((63, 128), np.uint16), "too small"),
        (np.zeros((128, 10), np.float32), "too small"),
        (np.full((64, 64), np.nan, np.float32), "NaN or infinite"),
        (np.where(np.eye(64, dtype=bool), np.inf, 1.0), "NaN or infinite"),
        (np.zeros((64, 64), bool), "dtype bool"),
        (np.zeros((64, 64), np.complex64), "dtype complex64"),
        (np.zeros((64, 64), object), "dtype object"),
        ([[0] * 64] * 64, "numpy array"),
    ],
)
def test_bad_frames_are_input_errors(tiny_refocuser: Refocuser, frame: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        tiny_refocuser(frame)


@pytest.mark.parametrize("pixel_size_um", [0.0, -1.0, float("nan"), float("inf"), 1e-9, 100.0, "0.3", True, [0.3]])
def test_bad_pixel_size_is_an_input_error(tiny_refocuser: Refocuser, pixel_size_um: object) -> None:
    with pytest.raises(InputError, match="pixel_size_um"):
        tiny_refocuser(np.ones((64, 64), np.float32), pixel_size_um=pixel_size_um)


def test_weights_that_are_not_ours_or_truncated(tmp_path: Path, tiny_weights: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(WeightsError, match="not an acquire-refocus weights file"):
        Refocuser.load(foreign, engine="torch")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated"):
        Refocuser.load(truncated, engine="torch")
    text = tmp_path / "notes.txt"
    text.write_text("174812789\nnot weights")
    with pytest.raises(WeightsError, match=r"not a PyTorch file: \w+Error: "):  # the reason names its kind
        Refocuser.load(text, engine="torch")


def test_engine_by_name_or_config(tiny_weights: Path) -> None:
    assert Refocuser.load(tiny_weights, engine=EngineConfig(backend="torch")).engine_name == "torch"
    with pytest.raises(ConfigError, match="unknown engine"):
        Refocuser.load(tiny_weights, engine="cuda-magic")
