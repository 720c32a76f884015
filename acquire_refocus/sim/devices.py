"""The simulated microscope as Micro-Manager devices, so every acquisition path runs without hardware.

`create_simulated_core` returns a pymmcore-plus `UniMMCore` holding Python device adapters: a camera
("SimCamera") that renders the simulated specimen at the current stage position and simulated time, a focus
stage ("SimZ") that refuses moves outside `simulator.z_limits_um`, and an XY stage ("SimXY"). With
`simulator.channels`, a filter turret ("SimFilter") picks the stain the camera sees, through one preset per channel
in the config group `simulator.channel_group`. With `simulator.focus_lock`, a hardware focus lock modelled on how
Micro-Manager exposes Nikon's PFS: "SimPFS" (property State On/Off, read-only Status Locked/Off/Lost) and
"SimPFSOffset" (its offset, a stage device). While locked it holds the coverslip: the Z drive follows the stand's
drift (`simulator.drift`), so only the sample's own drift (`simulator.sample_drift`) defocuses; a Z move then does
not happen (counted in `SimFocusStage.moves_while_locked`). Anything that talks to a Micro-Manager core
(`core.snapImage()`, `core.mda.run(MDASequence)`, the acquisition hooks) then acquires simulated frames exactly
as it would real ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from pymmcore_plus import FocusDirection
from pymmcore_plus.experimental.unicore import (
    Device,
    GenericDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    UniMMCore,
    XYStageDevice,
)

from acquire_refocus.config import OpticsConfig, SimulatorConfig
from acquire_refocus.core_lifetime import track_core
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.sim.drift import Drift
from acquire_refocus.sim.microscope import SimulatedMicroscope
from acquire_refocus.sim.multistain import stain_microscopes

log = logging.getLogger(__name__)

CAMERA_LABEL = "SimCamera"
FOCUS_LABEL = "SimZ"
XY_LABEL = "SimXY"
FILTER_LABEL = "SimFilter"
LOCK_LABEL = "SimPFS"
LOCK_OFFSET_LABEL = "SimPFSOffset"
LOCK_OFFSET_RANGE_UM = 50.0
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
        self.sample_drift = Drift(simulator.sample_drift)
        self.focus_stage: SimFocusStage | None = None  # set by create_simulated_core

    def stand_drift_um(self, t_s: float) -> float:
        """The stand's drift (coverslip relative to objective): what a focus lock sees and removes."""
        return float(self.drift.drift_um(t_s))

    def focus_z_um(self, stage_xy_um: Sequence[float] = (0.0, 0.0), t_s: float = 0.0) -> float:
        """In-focus stage Z: the stand's drift and tilt (SimulatedMicroscope) plus the sample's own drift."""
        return super().focus_z_um(stage_xy_um, t_s) + float(self.sample_drift.drift_um(t_s))

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
        self.focus_lock: SimFocusLock | None = None  # not `lock`: every device's lock() is its thread lock
        self.moves_while_locked = 0  # Z moves asked for while the lock held the drive (none happened)

    @property
    def physical_z_um(self) -> float:
        """Position in the simulator's frame, whatever origin the user has set; the lock's while it is engaged."""
        if self.focus_lock is not None and self.focus_lock.is_locked:
            return self.focus_lock.held_z_um()
        return self._physical_z_um

    def get_position_um(self) -> float:
        return self.physical_z_um - self._origin_um

    def set_position_um(self, val: float) -> None:
        if self.focus_lock is not None and self.focus_lock.is_locked:
            self.moves_while_locked += 1
            log.warning(kv("sim_z_move_while_locked", requested_um=val, note="the focus lock holds the Z drive"))
            return
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

    def release_lock(self) -> None:
        """The lock let go: the drive stays where the lock last held it."""
        if self.focus_lock is not None:
            self._physical_z_um = self.focus_lock.held_z_um()

    def set_adapter_origin_um(self, new_z_um: float) -> None:
        """Make the current position read as `new_z_um`; the simulated optics keep their own coordinates."""
        self._origin_um = self._physical_z_um - float(new_z_um)
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


class SimFilterWheel(StateDevice):
    """Filter turret: one state per stain (its label is the channel preset's name); the camera renders that one."""

    def __init__(self, channels: Sequence[str]) -> None:
        super().__init__(dict(enumerate(channels)))
        self._state = 0

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        self._state = int(position)

    @property
    def channel(self) -> str:
        return str(self._state_to_label[self._state])


class SimLockOffset(StageDevice):
    """The focus lock's offset (like Nikon's PFSOffset): where, relative to the coverslip, the lock holds focus.
    1 unit = 1 um of stage Z here (real devices have their own scale)."""

    def __init__(self) -> None:
        super().__init__()
        self._offset_um = 0.0

    def get_position_um(self) -> float:
        return self._offset_um

    def set_position_um(self, val: float) -> None:
        if not np.isfinite(val) or abs(val) > LOCK_OFFSET_RANGE_UM:
            raise StageLimitError(f"{LOCK_OFFSET_LABEL}: offset {val} outside +-{LOCK_OFFSET_RANGE_UM:g}")
        self._offset_um = float(val)
        self.core.events.stagePositionChanged.emit(self.get_label(), self._offset_um)

    def home(self) -> None:
        self.set_position_um(0.0)

    def stop(self) -> None:
        """Offset changes are instantaneous."""

    def set_adapter_origin_um(self, new_z_um: float) -> None:
        """The offset has no origin of its own to set."""

    def set_origin(self) -> None:
        """The offset has no origin of its own to set."""


class SimFocusLock(GenericDevice):
    """A hardware focus lock that holds the coverslip (Nikon PFS, ASI CRISP, Zeiss Definite Focus, Leica AFC).

    Engaged (property State On), it holds the Z drive at reference + offset + the stand's drift since, so the stand's
    drift never defocuses; the sample's drift relative to the coverslip still does. `lose()` drops the lock as a
    real one does (immersion gone, a plate edge): Status reads Lost and the drive stays where it was.
    """

    def __init__(self, scope: ClockedMicroscope, focus: SimFocusStage, offset: SimLockOffset) -> None:
        super().__init__()
        self._scope = scope
        self._focus = focus
        self._offset = offset
        self._status = "Off"
        self._reference_um = 0.0  # Z held at offset 0 and zero stand drift
        self.register_property(
            "State",
            default_value="Off",
            allowed_values=("On", "Off"),
            getter=_lock_state,
            setter=_set_lock_state,
        )
        self.register_property(
            "Status",
            default_value="Off",
            allowed_values=("Locked", "Off", "Lost"),
            getter=_lock_status,
            is_read_only=True,
        )

    @property
    def is_locked(self) -> bool:
        """Holding focus (not `locked`: every device's locked() says whether its thread lock is held)."""
        return self._status == "Locked"

    @property
    def status(self) -> str:
        return self._status

    def held_z_um(self) -> float:
        t_s = self._scope.clock_s()
        return self._reference_um + self._offset.get_position_um() + self._scope.stand_drift_um(t_s)

    def engage(self, on: bool) -> None:
        if on and not self.is_locked:
            z_um = self._focus.physical_z_um
            self._reference_um = (
                z_um - self._offset.get_position_um() - self._scope.stand_drift_um(self._scope.clock_s())
            )
            self._status = "Locked"
        elif not on:
            if self.is_locked:
                self._focus.release_lock()
            self._status = "Off"
        log.info(kv("sim_focus_lock", status=self._status))

    def lose(self) -> None:
        """Simulate losing the lock: the drive stays where the lock last held it, Status reads Lost."""
        if self.is_locked:
            self._focus.release_lock()
        self._status = "Lost"
        log.warning(kv("sim_focus_lock", status=self._status))


def _lock_state(lock: SimFocusLock) -> str:
    return "On" if lock.is_locked else "Off"


def _set_lock_state(lock: SimFocusLock, value: str) -> None:
    lock.engage(value == "On")


def _lock_status(lock: SimFocusLock) -> str:
    return lock.status


class SimCamera(SimpleCameraDevice):
    """Simulated sCMOS camera: each frame is the specimen rendered at the stages' positions and the scope's clock.

    Exposure is a settable property: photons scale with it (relative to `simulator.camera.exposure_ms`), and with
    the wall clock a frame takes that long.
    """

    def __init__(
        self,
        scope: ClockedMicroscope,
        focus: SimFocusStage,
        xy: SimXYStage,
        exposure_ms: float,
        stains: Mapping[str, SimulatedMicroscope] | None = None,
        filters: SimFilterWheel | None = None,
    ) -> None:
        super().__init__()
        self._scope = scope
        self._focus = focus
        self._xy = xy
        self._exposure_ms = float(exposure_ms)
        self._stains = dict(stains or {})
        self._filters = filters

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

    def snap(self, buffer: npt.NDArray[np.uint16]) -> Mapping[str, str]:
        z_um = self._focus.physical_z_um
        xy_um = self._xy.physical_xy_um
        t_s = self._scope.clock.frame_exposed(self._exposure_ms)
        channel = self._filters.channel if self._filters is not None else ""
        renderer = self._stains.get(channel, self._scope)
        buffer[:] = renderer.render(stage_z_um=z_um, stage_xy_um=xy_um, t_s=t_s, exposure_ms=self._exposure_ms)
        return {"SimTime_s": f"{t_s:.6f}", "SimStageZ_um": f"{z_um:.4f}", "SimChannel": channel}


def create_simulated_core(optics: OpticsConfig, simulator: SimulatorConfig) -> tuple[UniMMCore, ClockedMicroscope]:
    """A Micro-Manager core whose camera, focus drive and XY stage are the simulated microscope.

    The focus starts at `simulator.focus_z_um` (in focus at t = 0) and XY at the origin. The returned microscope
    is the one the camera renders with; `scope.clock_s()` is the simulated time its drift is evaluated at.
    """
    scope = ClockedMicroscope(optics, simulator)
    focus = SimFocusStage(simulator.z_limits_um, simulator.focus_z_um)
    xy = SimXYStage()
    filters = SimFilterWheel(list(simulator.channels)) if simulator.channels else None
    stains = stain_microscopes(optics, simulator, scope) if simulator.channels else {}
    camera = SimCamera(scope, focus, xy, simulator.camera.exposure_ms, stains, filters)
    devices: list[tuple[str, Device]] = [(CAMERA_LABEL, camera), (FOCUS_LABEL, focus), (XY_LABEL, xy)]
    if filters is not None:
        devices.append((FILTER_LABEL, filters))
    if simulator.focus_lock:
        offset = SimLockOffset()
        focus.focus_lock = SimFocusLock(scope, focus, offset)
        devices += [(LOCK_OFFSET_LABEL, offset), (LOCK_LABEL, focus.focus_lock)]

    scope.focus_stage = focus
    core = track_core(UniMMCore())
    for label, device in devices:
        core.loadPyDevice(label, device)
        core.initializeDevice(label)
    for name in simulator.channels:
        core.defineConfig(simulator.channel_group, name, FILTER_LABEL, "Label", name)
    if simulator.channels:
        core.setChannelGroup(simulator.channel_group)
        core.setConfig(simulator.channel_group, next(iter(simulator.channels)))
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
            channels=",".join(simulator.channels) or "-",
            focus_lock=simulator.focus_lock,
        )
    )
    return core, scope
