"""Weights files: round trip, and clear WeightsErrors for anything that is not ours or is damaged."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from acquire_refocus.config import MultiScaleModelConfig, OpticsConfig, UNetModelConfig
from acquire_refocus.errors import WeightsError
from acquire_refocus.model.checkpoint import (
    DEFAULT_WEIGHTS,
    TENSORS_SHA256,
    load_weights,
    read_payload,
    save_weights,
    tensors_sha256,
)
from acquire_refocus.model.network import build_network


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = MultiScaleModelConfig(base_channels=4, depth=2, scales=2)
    network = build_network(config).eval()
    optics = OpticsConfig(magnification=40, numerical_aperture=0.75)
    path = tmp_path / "model.pt"
    save_weights(path, network, config, optics, {"training": {"steps": 12}, "note": "test"})
    return path, network


def test_round_trip_keeps_network_optics_and_metadata(saved: tuple[Path, torch.nn.Module]) -> None:
    path, network = saved
    loaded = load_weights(path)
    assert loaded.model_config.architecture == "multiscale" and loaded.model_config.scales == 2
    assert loaded.optics.magnification == 40
    assert loaded.pixel_size_um == pytest.approx(6.5 / 40)
    assert loaded.metadata["training"]["steps"] == 12
    assert len(loaded.sha256) == 64
    assert not loaded.network.training
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(network(x), loaded.network(x), strict=True):
            torch.testing.assert_close(a, b)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nope.pt")


def test_foreign_pytorch_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="not an acquire-refocus weights file"):
        load_weights(path)


def test_truncated_file(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = saved
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated, damaged"):
        load_weights(truncated)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError):
        load_weights(path)


def test_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """weights_only loading: a pickle of an arbitrary object is rejected, never executed."""
    path = tmp_path / "pickle.pt"
    torch.save({"format": "acquire-refocus-weights", "payload": Path("/")}, path)
    with pytest.raises(WeightsError):
        load_weights(path)


def test_mismatched_parameters(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["base_channels"] = 8
    broken = tmp_path / "mismatch.pt"
    torch.save(payload, broken)
    with pytest.raises(WeightsError, match="do not match"):
        load_weights(broken)


def _flip_tensor_bytes(path: Path, tensor: torch.Tensor, n_bytes: int, out: Path) -> None:
    """Invert `n_bytes` of `tensor`'s stored bytes in the file (torch stores tensor data uncompressed)."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    assert len(raw) >= n_bytes
    start = data.find(raw[:256])
    assert start >= 0
    data[start : start + n_bytes] = bytes(b ^ 0xFF for b in data[start : start + n_bytes])
    out.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    """The issue's case: 4 KiB flipped inside the tensors loaded silently and changed the output."""
    torch.manual_seed(0)
    config = UNetModelConfig(base_channels=16, depth=2)
    network = build_network(config)
    path = tmp_path / "model.pt"
    save_weights(path, network, config, OpticsConfig(), {})
    largest = max(network.state_dict().values(), key=lambda t: t.numel())
    damaged = tmp_path / "damaged.pt"
    _flip_tensor_bytes(path, largest, 4096, damaged)
    assert torch.load(damaged, weights_only=True)["state_dict"]  # torch itself reads it without complaint
    with pytest.raises(
        WeightsError,
        match=rf"^{re.escape(str(damaged))}: damaged: its parameters do not match the "
        r"checksum written with them",
    ):
        load_weights(damaged)
    assert load_weights(path).sha256  # the intact file still loads


def test_a_file_without_a_checksum_loads_with_a_warning(
    saved: tuple[Path, torch.nn.Module], tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    path, network = saved
    payload = torch.load(path, weights_only=True)
    del payload[TENSORS_SHA256]
    legacy = tmp_path / "legacy.pt"
    torch.save(payload, legacy)
    loaded = load_weights(legacy)
    assert any(
        "event=weights_unverified" in r.getMessage() and str(legacy) in r.getMessage() for r in engine_log.records
    )
    torch.testing.assert_close(loaded.network.state_dict(), network.state_dict())


def test_the_shipped_weights_carry_a_checksum_that_verifies() -> None:
    payload, _ = read_payload(DEFAULT_WEIGHTS)
    assert payload[TENSORS_SHA256] == tensors_sha256(payload["state_dict"])
