"""Planners: what the acquisition hooks ask for Z, once per position and time point.

Both wait first, in correct mode, for the estimates of the frames already taken (`plan_after_estimates`, at most
`focus.estimate_wait_s`: the pipeline, not the disk or the network), then ask the controller to plan.
`EventPlanner` gives each useq event its Z (pymmcore-plus, `hooks.pymmcore_plus.FocusMDAEngine`);
`pycromanager_planner` gives a time point's offset (pycromanager's pre-hardware hook). The planned centre of a
time point is an event's Z less its plane's place in a relative z-stack and its channel's Z offset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import useq

from acquire_refocus.logs import kv
from acquire_refocus.sequence import event_axes

if TYPE_CHECKING:
    from acquire_refocus.focus.controller import FocusController
    from acquire_refocus.pipeline import FramePipeline

log = logging.getLogger(__name__)


def channel_z_offset_um(event: useq.MDAEvent) -> float:
    """The Z offset of the event's channel in its sequence (useq adds it to the event's Z; 0 without one)."""
    sequence = event.sequence
    c_index = event_axes(event).get("c")
    if sequence is None or c_index is None or c_index >= len(sequence.channels):
        return 0.0
    return float(sequence.channels[c_index].z_offset)


def planned_centre_shift_um(event: useq.MDAEvent) -> float:
    """How far the event's Z lies from its time point's planned centre: its z-stack plane plus its channel's
    offset."""
    return relative_z_um(event) + channel_z_offset_um(event)


def relative_z_um(event: useq.MDAEvent) -> float:
    """How far a plane of a relative z-stack lies from the stack's centre (0 without one)."""
    sequence = event.sequence
    z_index = event_axes(event).get("z")
    if sequence is None or z_index is None or sequence.z_plan is None or not sequence.z_plan.is_relative:
        return 0.0
    positions = list(sequence.z_plan)
    return float(positions[z_index]) if z_index < len(positions) else 0.0


EstimatesWait = Callable[[float], bool]
"""wait(timeout_s) -> whether the estimates of every frame taken so far arrived in time (`estimates_waiter`)."""


def estimates_waiter(controller: FocusController, pipeline: FramePipeline) -> EstimatesWait:
    """wait(timeout_s): until the controller has the results of every frame submitted so far."""
    return lambda timeout_s: controller.wait_for_frames(pipeline.stats().seen, timeout_s)


def plan_after_estimates(
    controller: FocusController,
    wait_for_estimates: EstimatesWait | None,
    position: int,
    centre_um: float,
    t_index: int,
) -> float:
    """The controller's offset for this position's time point (`FocusController.plan`), planned in correct mode
    only after the estimates of the frames already taken arrived, or `estimate_wait_s` passed (then logged): the
    first time point has none to wait for, and observe mode never waits."""
    cfg = controller.config
    if (
        controller.applies
        and wait_for_estimates is not None
        and cfg.estimate_wait_s > 0
        and t_index > 0
        and not wait_for_estimates(cfg.estimate_wait_s)
    ):
        log.warning(kv("focus_estimates_late", position=position, t=t_index, waited_s=cfg.estimate_wait_s))
    return controller.plan(position, centre_um, t_index)


class EventPlanner:
    """Per-event Z for one acquisition: plans each position's offset when its next time point starts, holds it
    for the rest of that time point, clamps every Z to the soft limits. Used by the pymmcore-plus engine
    (`FocusController.adjust_events`)."""

    def __init__(self, controller: FocusController, wait_for_estimates: EstimatesWait | None = None) -> None:
        self._controller = controller
        self._wait = wait_for_estimates
        self._planned_t: dict[int, int] = {}
        self._held: dict[int, float] = {}

    def restart(self, position: int, t_index: int) -> None:
        """A software autofocus just put the position in focus: its offset is 0 again for the rest of this time
        point and from now on (the autofocus's finding is the new planned Z)."""
        self._held[position] = 0.0
        self._planned_t[position] = t_index
        self._controller.restart_offset(position, t_index)

    def z_for(self, index: dict[str, int], nominal_z_um: float | None, relative_z_um: float = 0.0) -> float | None:
        """The Z to send for an event with useq `index` planned at `nominal_z_um` (None: leave Z alone)."""
        controller, cfg = self._controller, self._controller.config
        position, t_index = index.get("p", 0), index.get("t", 0)
        if nominal_z_um is None:
            return None
        if self._planned_t.get(position) != t_index:
            self._planned_t[position] = t_index
            centre_um = nominal_z_um - relative_z_um
            self._held[position] = plan_after_estimates(controller, self._wait, position, centre_um, t_index)
        if not controller.applies:
            return nominal_z_um
        z_um = nominal_z_um + self._held.get(position, 0.0)
        lo, hi = cfg.z_limits_um
        if not lo <= z_um <= hi:
            log.warning(
                kv(
                    "focus_z_clamped",
                    position=position,
                    t=t_index,
                    requested_um=f"{z_um:.3f}",
                    limits_um=f"{lo:g}..{hi:g}",
                )
            )
            z_um = min(hi, max(lo, z_um))
        return z_um


def pycromanager_planner(
    controller: FocusController, wait_for_estimates: EstimatesWait | None = None
) -> Callable[[int, float, int], float]:
    """`focus_planner` for `hooks.pycromanager.run_sequence`, called once per position and time point before its
    events run (`plan_after_estimates`): the offset to add to every Z of that time point (0 unless the mode is
    `correct`)."""

    def plan(position: int, centre_um: float, t_index: int) -> float:
        offset_um = plan_after_estimates(controller, wait_for_estimates, position, centre_um, t_index)
        return offset_um if controller.applies else 0.0

    return plan
