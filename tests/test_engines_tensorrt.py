"""TensorRT engine (torch-tensorrt): parity with PyTorch FP32, the named engine file, reload, rebuilds.

The GPU tests need an NVIDIA GPU and `pip install .[trt]`; elsewhere they are skipped with the reason. They
build engines for a reduced size range (64..512 px, batch 2) so a build takes about a minute, not ten.

PSNR, as used here: 10 log10(range^2 / MSE) with range = max - min of the PyTorch FP32 reference image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from acquire_refocus.config import EngineConfig
from acquire_refocus.engines import create_engine
from acquire_refocus.engines.tensorrt_engine import engine_path
from acquire_refocus.engines.tiling import infer_frame
from acquire_refocus.engines.torch_engine import TorchEngine
from acquire_refocus.model.network import FOCUS_CONTRACT_VERSION

NO_GPU = "needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine"


def test_engine_name_changes_with_model_gpu_tensorrt_and_precision(tmp_path: Path) -> None:
    """Runs anywhere: any change of what an engine was built for gives another file name (so it rebuilds)."""
    base = engine_path(tmp_path, "a" * 64, "NVIDIA-H100-80GB-HBM3", "10.3.0", "fp16")
    assert base.name == f"aaaaaaaaaaaa-f{FOCUS_CONTRACT_VERSION}_NVIDIA-H100-80GB-HBM3_trt10.3.0_fp16.ep"
    variants = [
        engine_path(tmp_path, "b" * 64, "NVIDIA-H100-80GB-HBM3", "10.3.0", "fp16"),
        engine_path(tmp_path, "a" * 64, "NVIDIA-RTX-A4000", "10.3.0", "fp16"),
        engine_path(tmp_path, "a" * 64, "NVIDIA-H100-80GB-HBM3", "10.7.0", "fp16"),
        engine_path(tmp_path, "a" * 64, "NVIDIA-H100-80GB-HBM3", "10.3.0", "fp32"),
    ]
    assert len({base, *variants}) == 5


def psnr_db(actual: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float64) - reference) ** 2))
    peak = float(reference.max() - reference.min())
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def frames(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32)
    return (np.cumsum(np.cumsum(data, axis=-1), axis=-2) / (shape[-1] * shape[-2] / 4)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_tensorrt() -> Any:
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    return pytest.importorskip("torch_tensorrt", reason="torch-tensorrt is not installed (pip install '.[trt]')")


@pytest.fixture(scope="module")
def loaded() -> Any:
    from acquire_refocus.model.checkpoint import load_weights

    return load_weights(None)  # the shipped model: FP16 accuracy matters for the weights users run


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt")


def trt_config(cache_dir: Path, precision: str = "fp16") -> EngineConfig:
    return EngineConfig.model_validate(
        dict(
            backend="tensorrt",
            precision=precision,
            cache_dir=cache_dir,
            min_size_px=64,
            opt_size_px=256,
            max_size_px=512,
            max_batch=2,
            tile_overlap_px=64,
        )
    )


@pytest.fixture(scope="module")
def fp16_engine(torch_tensorrt: Any, loaded: Any, cache_dir: Path) -> Any:
    engine = create_engine(loaded, trt_config(cache_dir))
    assert engine.name == "tensorrt", "the TensorRT engine must build on a GPU machine with torch-tensorrt"
    return engine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("shape", [(2, 1, 256, 256), (1, 1, 512, 384), (1, 1, 64, 64)])
def test_fp16_engine_matches_pytorch_fp32(
    fp16_engine: Any, loaded: Any, cache_dir: Path, shape: tuple[int, ...]
) -> None:
    reference = TorchEngine(loaded.network, trt_config(cache_dir, "fp32"), device="cpu")  # true FP32, no TF32
    batch = frames(shape, seed=sum(shape))
    expected_images, expected_focus = reference.run(batch)
    images, focus = fp16_engine.run(batch)
    assert fp16_engine.precision == "fp16" and fp16_engine.device.startswith("cuda")
    for k in range(shape[0]):
        assert psnr_db(images[k, 0], expected_images[k, 0]) >= 50.0
    assert np.max(np.abs(focus[:, 0] - expected_focus[:, 0])) <= 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_engine_is_saved_named_and_reloaded(
    fp16_engine: Any, loaded: Any, cache_dir: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    from acquire_refocus.engines.tensorrt_engine import gpu_label, tensorrt_version

    expected = engine_path(cache_dir, loaded.sha256, gpu_label(), tensorrt_version(), "fp16")
    assert fp16_engine.path == expected and expected.is_file()
    assert expected.with_name(expected.name + ".json").is_file()
    again = create_engine(loaded, trt_config(cache_dir))
    assert again.name == "tensorrt"
    assert "event=tensorrt_engine_loaded" in engine_log.text and "event=tensorrt_engine_built" not in engine_log.text
    batch = frames((1, 1, 128, 128), seed=3)
    np.testing.assert_array_equal(again.run(batch)[0], fp16_engine.run(batch)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_stale_and_corrupt_engines_are_rebuilt(
    fp16_engine: Any, loaded: Any, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    # An engine from another GPU lies beside: it is named as such, never loaded, and the right one is built.
    stale = engine_path(tmp_path, loaded.sha256, "Some-Other-GPU", "8.6.1", "fp16")
    stale.write_bytes(b"an engine for another GPU")
    engine: Any = create_engine(loaded, trt_config(tmp_path))  # a TensorRTEngine, with .path
    assert engine.name == "tensorrt" and engine.path != stale
    assert "event=tensorrt_engines_ignored" in engine_log.text and stale.name in engine_log.text
    assert "event=tensorrt_engine_built" in engine_log.text
    # The right name with damaged contents: detected, deleted, rebuilt.
    engine_log.clear()
    engine.path.write_bytes(b"garbage")
    rebuilt = create_engine(loaded, trt_config(tmp_path))
    assert rebuilt.name == "tensorrt"
    assert "event=tensorrt_engine_invalid" in engine_log.text and "event=tensorrt_engine_built" in engine_log.text
    batch = frames((1, 1, 64, 64), seed=4)
    np.testing.assert_allclose(rebuilt.run(batch)[0], fp16_engine.run(batch)[0], atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_auto_picks_tensorrt_and_tiles_frames_beyond_its_range(fp16_engine: Any, loaded: Any, cache_dir: Path) -> None:
    engine = create_engine(loaded, trt_config(cache_dir).model_copy(update={"backend": "auto"}))
    assert engine.name == "tensorrt"
    frame = frames((700, 601), seed=5)
    image, focus = infer_frame(engine, frame)
    assert image.shape == frame.shape and np.all(np.isfinite(image)) and np.isfinite(focus.defocus_um)
