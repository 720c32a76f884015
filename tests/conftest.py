"""Shared fixtures. Sockets are real ZeroMQ sockets on loopback, on ports chosen free for each test."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_tcp_address() -> str:
    """A loopback address whose port was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def tcp_address() -> Callable[[], str]:
    return free_tcp_address


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that call `cli.main`: its `setup_logging` adds our handler and stops propagation to the root
    logger; put the logger back afterwards so later tests see it as they would alone."""
    logger = logging.getLogger("acquire_refocus")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)


@pytest.fixture
def engine_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture our log lines even after setup_logging() stopped them propagating to the root logger."""
    ours = logging.getLogger("acquire_refocus")
    attach = not ours.propagate
    if attach:
        ours.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="acquire_refocus")
    yield caplog
    if attach:
        ours.removeHandler(caplog.handler)


# A small, fast simulated microscope: 128 x 128 frames, a specimen just larger than the frame, a clock that
# advances 2 s per frame (so drift shows within a few frames whatever the machine's speed).
FAST_SIMULATOR: dict = {
    "camera": {"width_px": 128, "height_px": 128, "exposure_ms": 10},
    "specimen": {"field_size_um": [200, 200], "photons_per_um3": 1500, "nuclei_per_mm2": 4000},
    "focus_z_um": 100.0,
    "z_limits_um": [50, 150],
    "time_per_frame_s": 2.0,
    "drift": {"model": "none"},
}


def write_serve_config(path: Path, weights: Path, sequence: dict, **sections: dict) -> Path:
    """A config file for a real `serve --once` subprocess: FAST_SIMULATOR, `weights` on torch with one thread, free
    loopback ports, focus observe, the simulator backend running `sequence`; `sections` replace or add top-level
    sections (e.g. focus, storage, log_file)."""
    import yaml

    config = {
        "simulator": FAST_SIMULATOR,
        "model": {"weights": str(weights)},
        "engine": {"backend": "torch", "num_threads": 1},
        "publishing": {"pub_address": free_tcp_address(), "control_address": free_tcp_address()},
        "focus": {"mode": "observe"},
        "acquisition": {"backend": "simulator", "sequence": sequence},
        **sections,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# 256 x 256 frames of a field with enough nuclei that sharpness and the closed loop have something to see.
SMALL_FIELD_SIMULATOR: dict = {
    **FAST_SIMULATOR,
    "camera": {"width_px": 256, "height_px": 256, "exposure_ms": 10},
    "specimen": {"field_size_um": [260, 260], "photons_per_um3": 1500, "nuclei_per_mm2": 3000},
}


@pytest.fixture(scope="session")
def small_field_scope() -> object:
    """The simulated microscope (real PSF, camera noise) on SMALL_FIELD_SIMULATOR, in focus at 100 um."""
    from acquire_refocus.config import parse_config
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    config = parse_config({"simulator": SMALL_FIELD_SIMULATOR})
    return SimulatedMicroscope(config.optics, config.simulator)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised small network saved as a weights file: fast, deterministic, not trained."""
    import torch

    from acquire_refocus.config import ModelConfig, OpticsConfig
    from acquire_refocus.model.checkpoint import save_weights
    from acquire_refocus.model.network import build_network

    torch.manual_seed(0)
    model_config = ModelConfig(base_channels=4, depth=2)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(path, build_network(model_config), model_config, OpticsConfig(), {"purpose": "tests"})
    return path


@pytest.fixture(scope="session")
def tiny_refocuser(tiny_weights: Path) -> object:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(1)
    return Refocuser.load(tiny_weights, engine="torch")
