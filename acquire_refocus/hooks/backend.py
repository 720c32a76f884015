"""Acquisition backends behind one interface: the simulated microscope, a real Micro-Manager core, pycromanager.

The daemon never asks which backend runs: it calls `create_backend(config)` once and then only the methods of
`AcquisitionBackend` (prepare, check a sequence, run it into a pipeline, cancel, close). The backend is picked by
`acquisition.backend` from `_BACKENDS`, as `acquire_refocus.engines` picks inference backends; adding a backend means
adding its module and one entry there (and the name to `AcquisitionConfig.backend`).

    simulator      a UniMMCore with the simulated microscope's devices      hooks/pymmcore_plus_backend.py
    pymmcore-plus  a CMMCorePlus with acquisition.mm_config_file loaded     hooks/pymmcore_plus_backend.py
    pycromanager   the Micro-Manager desktop application (or pycromanager's headless backend)
                                                                            hooks/pycromanager_backend.py
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import useq

if TYPE_CHECKING:
    from acquire_refocus.config import AppConfig
    from acquire_refocus.focus.controller import FocusController
    from acquire_refocus.pipeline import FrameCorrector, FramePipeline
    from acquire_refocus.storage import RawFrameLog


@dataclass(frozen=True)
class FrameFormat:
    """The frames the loaded hardware will deliver, known before the first one (disk-space check, stores)."""

    height_px: int
    width_px: int
    bytes_per_pixel: int
    pixel_size_um: float | None  # the hardware's calibration; None when uncalibrated


@dataclass(frozen=True)
class RunRequest:
    """One run for a backend: what to acquire, where its frames go, and how it is stopped."""

    sequence: useq.MDASequence
    pipeline: FramePipeline  # every frame is submitted here
    controller: FocusController | None  # the closed focus loop (observe or correct mode), None when off
    corrector: FrameCorrector  # the model of the loop's channel: it seeds a software autofocus
    output_dir: Path | None  # the run's folder (None: nothing saved)
    save_raw: bool  # raw frames saved by the backend in output_dir
    stop: threading.Event  # set when the run must end early; a backend polls it, or `cancel` interrupts it
    raw_log: RawFrameLog | None  # from `raw_frame_log`: the run connects it to its frames


class AcquisitionBackend(Protocol):
    """What the daemon needs from an acquisition backend. Methods may be called from the control thread (check),
    the acquisition thread (run) and a signal's thread (cancel) at once; implementations are thread-safe."""

    def prepare(self) -> None:
        """Load the hardware now, so that the first run request is checked against it (serve calls this)."""

    def check(self, sequence: useq.MDASequence) -> FrameFormat | None:
        """Refuse (UserError) a sequence the loaded hardware cannot run (a channel it lacks), before any store
        opens; the frames' format, or None when it is known only once frames arrive."""

    def raw_frame_log(self, output_dir: Path) -> RawFrameLog | None:
        """A per-frame log of the raw store the backend writes in `output_dir`, whose rows the daemon compares
        with the frames on disk; None where the backend's raw data cannot be counted so."""

    def run(self, request: RunRequest) -> None:
        """Acquire `request.sequence` in this thread, every frame to `request.pipeline`; blocks until done and
        raises what the acquisition raised."""

    def cancel(self) -> None:
        """Stop the run in progress soon (the frame in progress is finished, the raw store closed); a no-op when
        none runs. Called after `request.stop` is set."""

    def close(self) -> None:
        """Release the hardware (the daemon is closing)."""


def _simulator(config: AppConfig) -> AcquisitionBackend:
    from acquire_refocus.hooks.pymmcore_plus_backend import simulator_backend

    return simulator_backend(config)


def _pymmcore_plus(config: AppConfig) -> AcquisitionBackend:
    from acquire_refocus.hooks.pymmcore_plus_backend import hardware_backend

    return hardware_backend(config)


def _pycromanager(config: AppConfig) -> AcquisitionBackend:
    from acquire_refocus.hooks.pycromanager_backend import PycromanagerBackend

    return PycromanagerBackend(config)


_BACKENDS: dict[str, Callable[[AppConfig], AcquisitionBackend]] = {
    "simulator": _simulator,
    "pymmcore-plus": _pymmcore_plus,
    "pycromanager": _pycromanager,
}


def create_backend(config: AppConfig) -> AcquisitionBackend:
    """The backend `acquisition.backend` names; nothing is loaded until `prepare`, `check` or `run`."""
    return _BACKENDS[config.acquisition.backend](config)
