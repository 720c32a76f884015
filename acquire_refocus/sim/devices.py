"""The simulated microscope as Micro-Manager devices, so every acquisition path runs without hardware.

`create_simulated_core` returns a pymmcore-plus `UniMMCore` holding three Python device adapters: a camera
("SimCamera") that renders the simulated specimen at the current stage position and simulated time, a focus
stage ("SimZ") that refuses moves outside `simulator.z_limits_um`, and an XY stage ("SimXY"). Anything that
talks to a Micro-Manager core (`core.snapImage()`, `core.mda.run(MDASequence)`, the acquisition hooks) then
acquires simulated frames exactly as it would real ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import numpy as np
from pymmcore_plus import FocusDirection
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, StageDevice, UniMMCore, XYStageDevice

from acquire_refocus.config import OpticsConfig, SimulatorConfig
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.sim.microscope import SimulatedMicroscope

log = logging.getLogger(__name__)

CAMERA_LABEL = "SimCamera"
FOCUS_LABEL = "SimZ"
XY_LABEL = "SimXY"
PIXEL_SIZE_CONFIG = "SimObjective"


class SimClock:
    """Simulated time, which drives focus drift.

    With `time_per_frame_s` set, time advances by that much per frame, so drift builds up reproducibly however
    fast the machine renders. With None it is the wall clock since creation, and each frame takes its exposure.
    """

    def __init__(self, time_per_frame_s: float | None) -> None:
        self._time_per_frame_s = time_per_frame_s
        self._start = time.monotonic()
        self._frames = 0
        self._lock = threading.Lock()
        self.last_frame_s: float | None = None  # simulated time of the latest frame's exposure

    def now_s(self) -> float:
        if self._time_per_frame_s is None:
            return time.monotonic() - self._start
        with self._lock:
            return self._frames * self._time_per_frame_s

    def frame_exposed(self, exposure_ms: float) -> float:
        """Account for one frame; returns the simulated time at which it was exposed."""
        if self._time_per_frame_s is None:
            t_s = self.now_s()
            time.sleep(exposure_ms / 1000.0)
        else:
            with self._lock:
                t_s = self._frames * self._time_per_frame_s
                self._frames += 1
        self.last_frame_s = t_s
        return t_s


class ClockedMicroscope(SimulatedMicroscope):
    """The simulated microscope plus the clock its camera runs on, so callers can ask what time the drift is at."""

    def __init__(self, optics: OpticsConfig, simulator: SimulatorConfig) -> None:
        super().__init__(optics, simulator)
        self.clock = SimClock(simulator.time_per_frame_s)

    def clock_s(self) -> float:
        """Current simulated time in s (the time the next frame will be exposed at, with a fixed time per frame)."""
        return self.clock.now_s()

    @property
    def last_frame_t_s(self) -> float | None:
        """Simulated time at which the latest frame was exposed (None before the first): the drift it shows."""
        return self.clock.last_frame_s


class StageLimitError(UserError):
    """A focus move outside the simulated stage's travel; real drives refuse these too."""


class SimFocusStage(StageDevice):
    """Simulated focus drive. Increasing Z moves the focal plane deeper into the sample (objective up)."""

    def __init__(self, z_limits_um: tuple[float, float], start_z_um: float) -> None:
        super().__init__()
        self._limits_um = (float(z_limits_um[0]), float(z_limits_um[1]))
        self._physical_z_um = float(start_z_um)
        self._origin_um = 0.0  # reported Z = physical Z - origin, like a drive whose zero was re-set

    @property
    def physical_z_um(self) -> float:
        """Position in the simulator's frame, whatever origin the user has set."""
        return self._physical_z_um

    def get_position_um(self) -> float:
        return self._physical_z_um - self._origin_um

    def set_position_um(self, val: float) -> None:
        target_um = float(val) + self._origin_um
        lo, hi = self._limits_um
        if not np.isfinite(target_um) or not lo <= target_um <= hi:
            raise StageLimitError(
                f"{self.get_label() or FOCUS_LABEL}: refusing to move to Z = {val} um: outside the stage travel "
                f"{lo - self._origin_um:g} .. {hi - self._origin_um:g} um (simulator.z_limits_um)"
            )
        self._physical_z_um = target_um
        self.core.events.stagePositionChanged.emit(self.get_label(), self.get_position_um())

    def get_focus_direction(self) -> FocusDirection:
        # Positive moves bring the objective towards the sample; pymmcore-plus needs this to restore the
        # start position safely after an MDA.
        return FocusDirection.TowardSample

    def home(self) -> None:
        self.set_position_um(self._limits_um[0] - self._origin_um)

    def stop(self) -> None:
        """Moves are instantaneous, so there is never anything to stop."""

    def set_adapter_origin_um(self, newZUm: float) -> None:
        """Make the current position read as `newZUm`; the simulated optics keep their own coordinates."""
        self._origin_um = self._physical_z_um - float(newZUm)
        self.core.events.stagePositionChanged.emit(self.get_label(), self.get_position_um())

    def set_origin(self) -> None:
        self.set_adapter_origin_um(0.0)


class SimXYStage(XYStageDevice):
    """Simulated XY stage over the procedural specimen."""

    def __init__(self) -> None:
        super().__init__()
        self._physical_um = (0.0, 0.0)
        self._origin_um = (0.0, 0.0)

    @property
    def physical_xy_um(self) -> tuple[float, float]:
        return self._physical_um

    def get_position_um(self) -> tuple[float, float]:
        return (self._physical_um[0] - self._origin_um[0], self._physical_um[1] - self._origin_um[1])

    def set_position_um(self, x: float, y: float) -> None:
        if not (np.isfinite(x) and np.isfinite(y)):
            raise StageLimitError(f"{self.get_label() or XY_LABEL}: refusing to move to non-finite XY ({x}, {y})")
        self._physical_um = (float(x) + self._origin_um[0], float(y) + self._origin_um[1])
        self.core.events.XYStagePositionChanged.emit(self.get_label(), *self.get_position_um())

    def home(self) -> None:
        self.set_position_um(-self._origin_um[0], -self._origin_um[1])

    def stop(self) -> None:
        """Moves are instantaneous, so there is never anything to stop."""

    def set_adapter_origin_um(self, x: float, y: float) -> None:
        """Make the current position read as (x, y); the simulated specimen keeps its own coordinates."""
        self._origin_um = (self._physical_um[0] - float(x), self._physical_um[1] - float(y))

    def set_origin_x(self) -> None:
        self._origin_um = (self._physical_um[0], self._origin_um[1])

    def set_origin_y(self) -> None:
        self._origin_um = (self._origin_um[0], self._physical_um[1])


class SimCamera(SimpleCameraDevice):
    """Simulated sCMOS camera: each frame is the specimen rendered at the stages' positions and the scope's clock.

    Exposure is a settable property: photons scale with it (relative to `simulator.camera.exposure_ms`), and with
    the wall clock a frame takes that long.
    """

    def __init__(self, scope: ClockedMicroscope, focus: SimFocusStage, xy: SimXYStage, exposure_ms: float) -> None:
        super().__init__()
        self._scope = scope
        self._focus = focus
        self._xy = xy
        self._exposure_ms = float(exposure_ms)

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        if not 0.0 < float(exposure) <= 60_000.0:
            raise UserError(f"{CAMERA_LABEL}: exposure must be in (0, 60000] ms, got {exposure}")
        self._exposure_ms = float(exposure)
        self.core.events.exposureChanged.emit(self.get_label(), self._exposure_ms)

    def sensor_shape(self) -> tuple[int, int]:
        return self._scope.frame_shape

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def snap(self, buffer: np.ndarray) -> Mapping:
        z_um = self._focus.physical_z_um
        xy_um = self._xy.physical_xy_um
        t_s = self._scope.clock.frame_exposed(self._exposure_ms)
        buffer[:] = self._scope.render(stage_z_um=z_um, stage_xy_um=xy_um, t_s=t_s, exposure_ms=self._exposure_ms)
        return {"SimTime_s": f"{t_s:.6f}", "SimStageZ_um": f"{z_um:.4f}"}


def create_simulated_core(optics: OpticsConfig, simulator: SimulatorConfig) -> tuple[UniMMCore, ClockedMicroscope]:
    """A Micro-Manager core whose camera, focus drive and XY stage are the simulated microscope.

    The focus starts at `simulator.focus_z_um` (in focus at t = 0) and XY at the origin. The returned microscope
    is the one the camera renders with; `scope.clock_s()` is the simulated time its drift is evaluated at.
    """
    scope = ClockedMicroscope(optics, simulator)
    focus = SimFocusStage(simulator.z_limits_um, simulator.focus_z_um)
    xy = SimXYStage()
    camera = SimCamera(scope, focus, xy, simulator.camera.exposure_ms)

    core = UniMMCore()
    for label, device in ((CAMERA_LABEL, camera), (FOCUS_LABEL, focus), (XY_LABEL, xy)):
        core.loadPyDevice(label, device)
        core.initializeDevice(label)
    core.setCameraDevice(CAMERA_LABEL)
    core.setFocusDevice(FOCUS_LABEL)
    core.setXYStageDevice(XY_LABEL)
    core.setAutoShutter(False)  # there is no shutter: the simulated specimen is always lit
    core.definePixelSizeConfig(PIXEL_SIZE_CONFIG)
    core.setPixelSizeUm(PIXEL_SIZE_CONFIG, scope.pixel_size_um)
    core.setPixelSizeConfig(PIXEL_SIZE_CONFIG)
    height_px, width_px = scope.frame_shape
    log.info(
        kv(
            "simulated_core_ready",
            camera=CAMERA_LABEL,
            focus=FOCUS_LABEL,
            xy=XY_LABEL,
            frame_px=f"{width_px}x{height_px}",
            pixel_size_um=f"{scope.pixel_size_um:.4f}",
            time_per_frame_s=simulator.time_per_frame_s,
        )
    )
    return core, scope
