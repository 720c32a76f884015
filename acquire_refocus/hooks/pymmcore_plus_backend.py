"""The pymmcore-plus acquisition backend: a Micro-Manager core in this process runs `core.mda`.

Two backends share it and differ only in the core: "simulator" (a UniMMCore with the simulated microscope's
devices, `acquire_refocus.sim.devices`) and "pymmcore-plus" (a CMMCorePlus loading `acquisition.mm_config_file`,
`hooks.mm_hardware`). The core is loaded once, by whichever thread needs it first (serve, a run, or the control
thread checking a request), and released on close (`core_lifetime.release_core`: without it the process can abort
at exit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import useq
from pymmcore_plus import CMMCorePlus

from acquire_refocus.autofocus import software_autofocus
from acquire_refocus.config import AppConfig
from acquire_refocus.core_lifetime import release_core
from acquire_refocus.errors import ConfigError
from acquire_refocus.hooks.backend import FrameFormat, RunRequest
from acquire_refocus.hooks.pymmcore_plus import check_channels, run_sequence
from acquire_refocus.storage import RAW_FRAME_LOG, RAW_STORE, RawFrameLog

if TYPE_CHECKING:
    from acquire_refocus.sim.devices import ClockedMicroscope

LoadedCore = tuple[CMMCorePlus, "ClockedMicroscope | None"]
"""A loaded core, and the simulated microscope behind its devices (None for real hardware)."""


class PymmcorePlusBackend:
    """`AcquisitionBackend` on a pymmcore-plus core that `load_core` makes (hooks.backend says when)."""

    def __init__(self, config: AppConfig, load_core: Callable[[AppConfig], LoadedCore]) -> None:
        self._config = config
        self._load_core = load_core
        self._core: CMMCorePlus | None = None
        self._lock = threading.Lock()
        self.scope: ClockedMicroscope | None = None  # the simulated microscope, once the simulator's core is loaded

    def core(self) -> CMMCorePlus:
        """The core, loaded on first use."""
        with self._lock:
            if self._core is None:
                self._core, self.scope = self._load_core(self._config)
            return self._core

    def prepare(self) -> None:
        self.core()

    def check(self, sequence: useq.MDASequence) -> FrameFormat:
        core = self.core()
        check_channels(core, sequence)
        return FrameFormat(
            height_px=int(core.getImageHeight()),
            width_px=int(core.getImageWidth()),
            bytes_per_pixel=int(core.getBytesPerPixel()),
            pixel_size_um=core.getPixelSizeUm() or None,
        )

    def raw_frame_log(self, output_dir: Path) -> RawFrameLog:
        return RawFrameLog(output_dir / RAW_FRAME_LOG)

    def run(self, request: RunRequest) -> None:
        core = self.core()
        acq = self._config.acquisition
        raw_log = request.raw_log
        if raw_log is not None:
            core.mda.events.frameReady.connect(raw_log.frameReady)
        try:
            run_sequence(
                core,
                request.sequence,
                request.pipeline,
                controller=request.controller,
                raw_path=request.output_dir / RAW_STORE if request.save_raw and request.output_dir else None,
                pixel_size_um=acq.pixel_size_um,
                autofocus=software_autofocus(self._config, request.corrector, request.controller, request.output_dir),
            )
        finally:
            if raw_log is not None:
                core.mda.events.frameReady.disconnect(raw_log.frameReady)

    def cancel(self) -> None:
        core = self._core
        if core is not None:
            core.mda.cancel()

    def close(self) -> None:
        with self._lock:
            core, self._core = self._core, None
        if core is not None:
            release_core(core)  # releases the hardware (or the simulated devices) and the notification callback


def _simulated_core(config: AppConfig) -> LoadedCore:
    from acquire_refocus.sim.devices import create_simulated_core

    core, scope = create_simulated_core(config.optics, config.simulator)
    focus_device = config.acquisition.focus_device
    if focus_device:
        try:
            core.setFocusDevice(focus_device)
        except BaseException:
            release_core(core)
            raise
    return core, scope


def _hardware_core(config: AppConfig) -> LoadedCore:
    from acquire_refocus.hooks.mm_hardware import load_hardware_core

    acq = config.acquisition
    if acq.mm_config_file is None:
        raise ConfigError(
            "acquisition.mm_config_file: required for backend pymmcore-plus (the .cfg file of your microscope)"
        )
    return load_hardware_core(acq.mm_config_file, acq.mm_app_path, focus_device=acq.focus_device), None


def simulator_backend(config: AppConfig) -> PymmcorePlusBackend:
    """acquisition.backend "simulator": the simulated microscope in a UniMMCore."""
    return PymmcorePlusBackend(config, _simulated_core)


def hardware_backend(config: AppConfig) -> PymmcorePlusBackend:
    """acquisition.backend "pymmcore-plus": the microscope of acquisition.mm_config_file."""
    return PymmcorePlusBackend(config, _hardware_core)
