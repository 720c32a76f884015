"""pymmcore-plus acquisitions (`core.mda`, real hardware or the simulated microscope) -> pipeline.

`PymmcorePlusHook` listens to `core.mda.events.frameReady`, which pymmcore-plus emits in its acquisition thread
right after the raw frame went to the run's own writer: the hook only builds a `FrameInfo` and calls
`pipeline.submit` (no copy, no I/O). `FocusMDAEngine` is pymmcore-plus's `MDAEngine` (subclassed through its
public `setup_event` / `event_iterator` methods) with the closed focus loop: every event's Z gets its position's
current offset, planned when a time point starts. `run_sequence`
puts it together: raw data written by pymmcore-plus's writer (ome-writers OME-Zarr), frames to the pipeline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import useq
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.core import SequencedEvent
from pymmcore_plus.mda import MDAEngine

from acquire_refocus.autofocus import FocusDrive, SoftwareAutofocus
from acquire_refocus.errors import UserError
from acquire_refocus.focus.controller import FocusController
from acquire_refocus.focus.planners import (
    EventPlanner,
    channel_z_offset_um,
    estimates_waiter,
    planned_centre_shift_um,
)
from acquire_refocus.focus_lock import FocusLock, focus_lock_for
from acquire_refocus.logs import kv
from acquire_refocus.pipeline import FrameInfo, FramePipeline
from acquire_refocus.sequence import event_axes, nested_event_count
from acquire_refocus.storage import raw_store_settings

log = logging.getLogger(__name__)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class PymmcorePlusHook:
    """Hands every frame of `core.mda` runs to the pipeline. Connect with `with hook:` or connect()/disconnect()."""

    def __init__(
        self,
        core: CMMCorePlus,
        pipeline: FramePipeline,
        pixel_size_um: float | None = None,
        focus_z_reader: Callable[[], float] | None = None,
    ) -> None:
        """`focus_z_reader`: where the frame's focus coordinate comes from instead of the stage Z (a focus lock's
        offset, when the loop moves that)."""
        self._core = core
        self._pipeline = pipeline
        self._pixel_size_um = pixel_size_um
        self._focus_z_reader = focus_z_reader
        self.frames = 0

    def frameReady(self, image: np.ndarray, event: useq.MDAEvent, meta: Mapping[str, Any]) -> None:  # noqa: N802 - pymmcore-plus's event name
        """Runs in the acquisition thread: build the FrameInfo and enqueue; never raises."""
        try:
            self._pipeline.submit(image, self.frame_info(event, meta))
            self.frames += 1
        except Exception as exc:  # noqa: BLE001 - the acquisition must not stop because of the correction side; logged
            log.error(kv("pymmcore_plus_hook_failed", error=repr(exc)))

    def frame_info(self, event: useq.MDAEvent, meta: Mapping[str, Any]) -> FrameInfo:
        position = meta.get("position") or {}
        z_um = _finite(self._focus_z_reader()) if self._focus_z_reader is not None else _finite(position.get("z"))
        if z_um is None:
            z_um = _finite(event.z_pos)
        x_um, y_um = _finite(position.get("x", event.x_pos)), _finite(position.get("y", event.y_pos))
        pixel_size_um = self._pixel_size_um or _finite(meta.get("pixel_size_um")) or None
        return FrameInfo(
            axes=event_axes(event),
            stage_z_um=z_um,
            stage_xy_um=(x_um, y_um) if x_um is not None and y_um is not None else None,
            t_acquired=time.time(),
            pixel_size_um=pixel_size_um,
            channel=event.channel.config if event.channel is not None else None,
            channel_z_offset_um=channel_z_offset_um(event),
        )

    def connect(self) -> None:
        self._core.mda.events.frameReady.connect(self.frameReady)

    def disconnect(self) -> None:
        self._core.mda.events.frameReady.disconnect(self.frameReady)

    def __enter__(self) -> PymmcorePlusHook:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


class FocusMDAEngine(MDAEngine):
    """pymmcore-plus's MDAEngine with the closed focus loop and the software autofocus.

    The Z offset is applied in `setup_event`, the moment the runner is about to execute an event (every earlier
    frame is taken by then), not when the event is pulled from the iterator: pymmcore-plus looks ahead there to
    merge events into hardware sequences. `event_iterator` only stops such merging across time points, so each
    time point can start at a new Z while a z-stack within one time point can still run as a hardware sequence
    (shifted as a whole). In correct mode the first event of a time point waits (at most
    `focus.estimate_wait_s`) for the estimates of the frames already taken (not for the disk or the network);
    observe mode never waits.

    An autofocus event of the sequence's `autofocus_plan` whose `autofocus_device_name` is the software
    autofocus's (`focus.autofocus.device_name`, default "acquire-refocus") runs `SoftwareAutofocus` instead of the
    core's hardware autofocus, on the channel that drives the loop; the focus it finds shifts the planned Z of that
    position's following events (a z-stack is centred on it), and the loop's offset there starts again from 0.
    Other autofocus events go to the hardware autofocus as pymmcore-plus does it.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        controller: FocusController | None,
        pipeline: FramePipeline | None = None,
        autofocus: SoftwareAutofocus | None = None,
        lock: FocusLock | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(core, **kwargs)
        self._lock = lock
        self._lock_base_um = 0.0
        self._lock_lost_since: tuple[int, int] | None = None  # (position, t) where the lock was found lost
        self._controller = controller
        self._wait = estimates_waiter(controller, pipeline) if pipeline is not None and controller else None
        self._planner = EventPlanner(controller, self._wait) if controller is not None else None
        self._autofocus = autofocus
        self._autofocus_shift_um: dict[int, float] = {}  # per position: focus found minus the planned Z
        self._start_z_um: float | None = None

    def setup_sequence(self, sequence: useq.MDASequence) -> Any:
        core = self.mmcore
        self._start_z_um = core.getZPosition() if core.getFocusDevice() else None
        self._planner = EventPlanner(self._controller, self._wait) if self._controller is not None else None
        self._autofocus_shift_um = {}
        if self._lock is not None:
            self._lock_base_um = self._lock.offset_um()  # the loop's offsets are relative to the user's
            self._lock_lost_since = None
            self.restore_initial_state = False  # restoring the start state would move the Z drive
        return super().setup_sequence(sequence)

    def exec_event(self, event: useq.MDAEvent) -> Iterable[Any]:
        if self._is_software_autofocus(event):
            self._run_autofocus(event)
            return ()
        return super().exec_event(event)

    def _is_software_autofocus(self, event: useq.MDAEvent) -> bool:
        action = event.action
        return (
            self._autofocus is not None
            and isinstance(action, useq.HardwareAutofocus)
            and action.autofocus_device_name == self._autofocus.config.device_name
        )

    def _run_autofocus(self, event: useq.MDAEvent) -> None:
        """The software autofocus at this event's position, from where setup_event put the stage."""
        assert self._autofocus is not None
        core = self.mmcore
        index = event_axes(event)
        position, t_index = index.get("p", 0), index.get("t", 0)
        channel = self._controller.channel if self._controller is not None else None
        if channel is not None and event.sequence is not None:
            group = next((c.group for c in event.sequence.channels if c.config == channel), None)
            if group is not None:
                core.setConfig(group, channel)
        start_um = core.getZPosition()
        result = self._autofocus.run(FocusDrive(core), start_um, label=f"p{position}_t{t_index}")
        if not result.succeeded:
            return
        nominal = event.z_pos if event.z_pos is not None else self._start_z_um
        if nominal is None:
            return
        self._autofocus_shift_um[position] = result.focus_z_um - nominal
        if self._planner is not None:
            self._planner.restart(position, t_index)

    def event_iterator(self, events: Iterable[useq.MDAEvent]) -> Iterator[useq.MDAEvent]:
        for time_point in _split_time_points(events):
            yield from super().event_iterator(time_point)

    def setup_event(self, event: useq.MDAEvent) -> None:
        super().setup_event(self._adjusted(event))

    def _adjusted(self, event: useq.MDAEvent) -> useq.MDAEvent:
        """The event with its Z shifted by the software autofocus's finding and the loop's offset."""
        if self._lock is not None:
            return self._through_lock(event)
        first = event.events[0] if isinstance(event, SequencedEvent) and event.events else event
        planned = first.z_pos if first.z_pos is not None else self._start_z_um
        if planned is None:
            return event
        index = event_axes(first)
        nominal = planned + self._autofocus_shift_um.get(index.get("p", 0), 0.0)
        if self._planner is None:
            z_um: float | None = nominal
        else:  # an autofocus event's Z is its position's centre, not a plane of the stack
            shift = 0.0 if isinstance(first.action, useq.HardwareAutofocus) else planned_centre_shift_um(first)
            z_um = self._planner.z_for(index, nominal, shift)
        if z_um is None or (z_um == planned and event.z_pos is None):
            return event
        offset_um = z_um - planned
        update: dict[str, Any] = {"z_pos": (event.z_pos if event.z_pos is not None else planned) + offset_um}
        if isinstance(event, SequencedEvent) and event.z_sequence:
            lo, hi = self._controller.config.z_limits_um if self._controller is not None else (-math.inf, math.inf)
            update["z_sequence"] = tuple(min(hi, max(lo, z + offset_um)) for z in event.z_sequence)
        return event.model_copy(update=update)

    def _through_lock(self, event: useq.MDAEvent) -> useq.MDAEvent:
        """actuator autofocus_offset: the loop's offset goes to the lock; the event's Z is dropped (the Z drive is
        never moved in this mode). While the lock reports it is not engaged, nothing is corrected."""
        assert self._lock is not None and self._planner is not None and self._controller is not None
        first = event.events[0] if isinstance(event, SequencedEvent) and event.events else event
        index = event_axes(first)
        position, t_index = index.get("p", 0), index.get("t", 0)
        if not self._lock.locked():
            if self._lock_lost_since is None:
                self._lock_lost_since = (position, t_index)
                self._controller.note_lock_lost(position, t_index)
        else:
            if self._lock_lost_since is not None:
                log.info(kv("focus_lock_back", position=position, t=t_index, lost_at=self._lock_lost_since))
                self._lock_lost_since = None
            offset_um = self._planner.z_for(index, self._lock_base_um, 0.0)
            if offset_um is not None and offset_um != self._lock.offset_um():
                self._lock.set_offset_um(offset_um)
        return event.model_copy(update={"z_pos": None}) if event.z_pos is not None else event


def _split_time_points(events: Iterable[useq.MDAEvent]) -> Iterator[list[useq.MDAEvent]]:
    """Consecutive events of the same time point, as lists (reading ahead in the plan moves nothing)."""
    batch: list[useq.MDAEvent] = []
    for event in events:
        if batch and event.index.get("t", 0) != batch[-1].index.get("t", 0):
            yield batch
            batch = []
        batch.append(event)
    if batch:
        yield batch


def run_sequence(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    pipeline: FramePipeline,
    *,
    controller: FocusController | None = None,
    raw_path: str | Path | None = None,
    pixel_size_um: float | None = None,
    autofocus: SoftwareAutofocus | None = None,
) -> None:
    """Acquire `sequence` with `core.mda` in this thread, every frame to `pipeline`; blocks until done.

    Raw frames go to `raw_path` (OME-Zarr via pymmcore-plus's own ome-writers sink, one chunk per frame) when
    given. With a controller in observe/correct mode, a `FocusMDAEngine` drives the run and the previous engine
    is put back afterwards. Raises what the MDA raised (after disconnecting everything); a channel the core has no
    preset for is a UserError before anything starts.
    """
    check_channels(core, sequence)
    if sequence.autofocus_plan is not None:
        # useq's AxesBasedAF remembers the last event it saw: an earlier pass over the sequence (counting its
        # frames) would make it skip the first position's autofocus. A fresh copy starts clean.
        plan = sequence.autofocus_plan
        sequence = sequence.model_copy(update={"autofocus_plan": type(plan).model_validate(plan.model_dump())})
    output: Any = None
    if raw_path is not None:
        output = raw_store_settings(
            Path(raw_path),
            sequence,
            core.getImageHeight(),
            core.getImageWidth(),
            str(np.dtype(f"uint{8 * core.getBytesPerPixel()}")) if core.getBytesPerPixel() in (1, 2, 4) else "uint16",
            pixel_size_um or core.getPixelSizeUm() or None,
        )
    old_engine = None
    loop = controller if controller is not None and controller.mode != "off" else None
    software_af = autofocus if autofocus is not None and uses_software_autofocus(sequence, autofocus) else None
    lock = (
        focus_lock_for(core, loop.config) if loop is not None and loop.config.actuator == "autofocus_offset" else None
    )
    if lock is not None and software_af is not None:
        raise UserError(
            "focus.actuator autofocus_offset and a software autofocus_plan together: the software "
            "autofocus moves the Z drive, which a focus lock holds; use one or the other"
        )
    if loop is not None or software_af is not None:
        old_engine = core.mda.set_engine(FocusMDAEngine(core, loop, pipeline, software_af, lock))
    log.info(
        kv(
            "mda_run_start",
            backend="pymmcore-plus",
            core=type(core).__name__,
            raw=raw_path or "not saved",
            focus=controller.mode if controller is not None else "off",
            events=nested_event_count(sequence),
        )
    )
    try:
        with PymmcorePlusHook(core, pipeline, pixel_size_um, lock.offset_um if lock is not None else None):
            core.mda.run(sequence, output=output)
    finally:
        if old_engine is not None:
            core.mda.set_engine(old_engine)
    log.info(kv("mda_run_done", frames=pipeline.stats().seen))


def uses_software_autofocus(sequence: useq.MDASequence, autofocus: SoftwareAutofocus) -> bool:
    """Whether the sequence's autofocus plan (or a position's sub-sequence's) names the software autofocus."""
    plans = [sequence.autofocus_plan] + [p.sequence.autofocus_plan for p in sequence.stage_positions if p.sequence]
    return any(plan is not None and plan.autofocus_device_name == autofocus.config.device_name for plan in plans)


def check_channels(core: CMMCorePlus, sequence: useq.MDASequence) -> None:
    """UserError for a channel whose group or preset the loaded hardware configuration lacks (a typo in the
    sequence), naming the presets there are: pymmcore-plus would fail on its first frame with a traceback."""
    for channel in sequence.channels:
        if not core.isGroupDefined(channel.group):
            groups = ", ".join(core.getAvailableConfigGroups()) or "none"
            raise UserError(
                f"acquisition.sequence: channel group {channel.group!r} is not in the hardware "
                f"configuration (groups: {groups})"
            )
        presets = core.getAvailableConfigs(channel.group)
        if channel.config not in presets:
            raise UserError(
                f"acquisition.sequence: channel {channel.config!r} is not a preset of group "
                f"{channel.group!r} (presets: {', '.join(presets) or 'none'})"
            )
