"""Shared fixtures (presets, helpers and test doubles are in support.py). Sockets are real ZeroMQ sockets on
loopback, on ports chosen free for each test."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import SMALL_FIELD_SIMULATOR, free_tcp_address


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

    from acquire_refocus.config import OpticsConfig, UNetModelConfig
    from acquire_refocus.model.checkpoint import save_weights
    from acquire_refocus.model.network import build_network

    torch.manual_seed(0)
    model_config = UNetModelConfig(base_channels=4, depth=2)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(path, build_network(model_config), model_config, OpticsConfig(), {"purpose": "tests"})
    return path


@pytest.fixture(scope="session")
def tiny_refocuser(tiny_weights: Path) -> object:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(1)
    return Refocuser.load(tiny_weights, engine="torch")
