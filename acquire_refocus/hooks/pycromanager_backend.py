"""The pycromanager acquisition backend: the Micro-Manager desktop application (or pycromanager's headless Python
backend) acquires; `hooks.pycromanager.run_sequence` hands its frames to the pipeline and saves raw data as NDTiff.

There is no Micro-Manager core in this process to load, check against or release: the application checks its own
channels, the frame size is known only once frames arrive, and a run stops when its `stop` event is set (the
submission loop polls it).
"""

from __future__ import annotations

from pathlib import Path

import useq

from acquire_refocus.config import AppConfig
from acquire_refocus.focus.planners import estimates_waiter, pycromanager_planner
from acquire_refocus.hooks import pycromanager
from acquire_refocus.hooks.backend import FrameFormat, RunRequest
from acquire_refocus.storage import RawFrameLog


class PycromanagerBackend:
    """`AcquisitionBackend` for acquisition.backend "pycromanager" (see the module docstring)."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config

    def prepare(self) -> None:
        """Nothing to load: the desktop application holds the hardware (it is reached when a run starts)."""

    def check(self, sequence: useq.MDASequence) -> FrameFormat | None:
        """Nothing to check here, and no frame size before the first frame: the application checks its channels."""
        return None

    def raw_frame_log(self, output_dir: Path) -> RawFrameLog | None:
        """None: pycromanager's NDTiff raw data is not counted against a log."""
        return None

    def run(self, request: RunRequest) -> None:
        acq = self._config.acquisition
        controller = request.controller
        planner = None
        if controller is not None:  # observe mode plans (and logs) too, and always returns 0
            planner = pycromanager_planner(controller, estimates_waiter(controller, request.pipeline))
        pycromanager.run_sequence(
            request.sequence,
            request.pipeline,
            focus_planner=planner,
            stop_event=request.stop,
            directory=request.output_dir if request.save_raw else None,
            name="raw",
            pixel_size_um=acq.pixel_size_um,
            focus_device=acq.focus_device,
            port=acq.pycromanager_port,
        )

    def cancel(self) -> None:
        """Nothing more than the run's `stop` event, which the submission loop polls."""

    def close(self) -> None:
        """Nothing to release: the hardware stays with the desktop application."""
