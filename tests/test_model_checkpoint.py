"""Weights files: round trip, and clear WeightsErrors for anything that is not ours or is damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acquire_refocus.config import ModelConfig, OpticsConfig
from acquire_refocus.errors import WeightsError
from acquire_refocus.model.checkpoint import load_weights, save_weights
from acquire_refocus.model.network import build_network


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = ModelConfig(architecture="multiscale", base_channels=4, depth=2, scales=2)
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
        for a, b in zip(network(x), loaded.network(x)):
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
