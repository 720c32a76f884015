"""The closed focus loop's state: per position, the window of estimates and sharpness samples, the offset it holds
and the moves it made (`FocusController`). What it does with them is described in the docstring of
`acquire_refocus.focus`; the fits are in `focus.estimators`, the waiting planners in `focus.planners`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import useq

from acquire_refocus.config import FocusConfig, OpticsConfig
from acquire_refocus.errors import UserError
from acquire_refocus.focus.estimators import (
    Estimate,
    SharpnessSample,
    drift_rate_um_per_time_point,
    latest_stack,
    min_sharpness_span_um,
    network_focus_z,
    probe_focus_z,
    sharpness_focus_z,
    sharpness_jumped,
)
from acquire_refocus.focus.planners import EstimatesWait, EventPlanner, planned_centre_shift_um
from acquire_refocus.logs import kv
from acquire_refocus.pipeline import FrameResult
from acquire_refocus.sequence import event_axes
from acquire_refocus.sharpness import MIN_STRUCTURE_RATIO, BandPassSharpness

log = logging.getLogger(__name__)

_MAX_STACK_PLANES = 256  # sharpness samples kept per position: room for the planes of one z-stack
_DRIFT_FIT_TIME_POINTS = 6  # drift rate: from the fitted focus of this many recent time points
# A fitted focus further than this fraction of sharpness_range_um from the previous one is a jump, not drift (2 um
# for the default optics; the fastest drift tested moves focus 1.2 um per 3-plane time point): the drift rate
# starts again from it, or a step would be extrapolated as drift and overshot.
_FOCUS_JUMP_FRACTION_OF_RANGE = 0.5
_APPLIED_OFFSET_TIME_POINTS = 16  # per position, the offsets handed out that the focus log may still ask about


def check_hold(config: FocusConfig, z_planes: int) -> None:
    """UserError when `focus.hold: start` meets a sequence without z-stacks of 3 or more planes (checked before a
    run starts, in the reply to a run request, and by the controller). It learns the plane to hold from the first
    sharpness fit: from single dithered frames taken a time point apart under drift that fit was off by up to 2 um,
    and the demo held focus worse than hold: sharpest in 2 of 3 seeds at 60x and at 20x
    (tools/reports/presets/README.md)."""
    if config.hold == "start" and config.mode != "off" and z_planes < 3:
        raise UserError(
            "focus.hold: start learns the plane to hold from each position's first z-stack, so the sequence needs "
            f"a z_plan of 3 or more planes per time point (this one takes {z_planes}); otherwise use hold: sharpest"
        )


@dataclass(frozen=True)
class FocusMove:
    position: int
    t_index: int
    offset_before_um: float
    offset_after_um: float
    error_um: float
    applied: bool  # False in observe mode
    clamped: bool
    source: str  # what located focus: "network", "probe" or "sharpness"


class FocusController:
    """FrameSink collecting estimates, and the planner the acquisition hook asks for Z offsets.

    `on_frame` runs in the pipeline's dispatch thread, `adjust_events` / `offset_um` in the acquisition thread,
    the sharpness measure (fine_source sharpness) in a thread of its own that `close` stops; a lock keeps them
    consistent, and `plan` first waits (at most `estimate_wait_s`) for frames still being measured.
    """

    def __init__(
        self, config: FocusConfig, optics: OpticsConfig | None = None, z_planes: int = 1, channel: str | None = None
    ) -> None:
        """`optics`: the optics frames come from (default: `OpticsConfig()`), for the sharpness measure's band.
        `z_planes`: planes per time point of the acquisition (its z-plan); from 3 on, the stage is not dithered.
        `channel`: the channel whose frames drive the loop (None: every frame, for acquisitions without channels)."""
        check_hold(config, z_planes)
        self.config = config
        self._z_planes = z_planes
        self.channel = channel
        optics = (optics or OpticsConfig()).for_channel(channel)
        self._sharpness = (
            BandPassSharpness.for_optics(optics, config.sharpness_band_um)
            if config.fine_source == "sharpness"
            else None
        )
        self.sharpness_dither_um, self.sharpness_width_um, self.sharpness_range_um = config.sharpness_settings_um(
            optics
        )
        self._lock = threading.Lock()
        self._window: dict[int, deque[Estimate]] = {}
        self._sharpness_window: dict[int, deque[SharpnessSample]] = {}
        self._dither_side: dict[int, float] = {}
        self._fine_history: dict[int, deque[tuple[int, float]]] = {}  # (t, fitted focus Z) per position
        self._sharpness_frames = max(2, config.window_frames)  # frames in a fit without a z-stack
        # the sharpness measure (~2 ms a frame) runs in a thread of its own, off the dispatch thread
        self._to_measure: queue.Queue[tuple[int, int, float, np.ndarray, float | None] | None] = queue.Queue(maxsize=4)
        self._measurer: threading.Thread | None = None
        self._measurements_pending = 0
        self._side: dict[int, float] = {}  # probe mode: sign of the last resolved defocus per position
        self._centre_um: dict[int, float] = {}
        self._offset_um: dict[int, float] = {}
        self._held_offset_um: dict[int, float] = {}  # hold start: the plane held, from the sharpest one
        self._applied_um: dict[int, deque[tuple[int, float]]] = {}  # (t, offset given to its frames) per position
        self._last_defocus_um: dict[int, float] = {}
        self._frames_seen = threading.Condition(self._lock)
        self.frames = 0  # results seen, usable or not
        self.moves: list[FocusMove] = []
        self.accepted = 0
        self.rejected = 0
        self.clamps = 0
        self.sharpness_measured = 0  # frames whose sharpness entered a window
        self.sharpness_restarts = 0
        self.sharpness_blank = 0  # frames left out of the sharpness fit: too little structure (sharpness.py)
        self.other_channel_frames = 0  # frames of channels that do not drive the loop (never used)
        self.refused = 0  # moves over max_step_um refused (max_step_action refuse)
        self.lock_lost = 0  # times the hardware focus lock was found not engaged (actuator autofocus_offset)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def applies(self) -> bool:
        return self.config.mode == "correct"

    # ----------------------------------------------------------------- estimates (dispatch thread)
    def on_frame(self, result: FrameResult) -> None:
        if self.channel is not None and result.info.channel != self.channel:
            with self._lock:
                self.frames += 1
                self.other_channel_frames += 1
                self._frames_seen.notify_all()
            return
        position = int(result.info.axes.get("p", 0))
        focus_z_um = result.info.stage_z_um
        if focus_z_um is not None:
            focus_z_um -= result.info.channel_z_offset_um  # the focus Z this frame's sharpness and estimate belong to
            if not math.isfinite(focus_z_um):
                focus_z_um = None
        # sharpness (fine_source sharpness): any frame with pixels and a stage Z, refocused or not (skipped frames
        # count: the engine need not have seen them), measured in the controller's own thread
        to_measure = (
            (position, int(result.info.axes.get("t", 0)), focus_z_um, result.raw, result.info.pixel_size_um)
            if self._sharpness is not None
            and result.raw is not None
            and result.status != "failed"
            and focus_z_um is not None
            else None
        )
        estimate = (
            Estimate(focus_z_um, result.defocus_um, abs(result.defocus_magnitude_um))
            if focus_z_um is not None and self._usable(result)
            else None
        )
        with self._lock:
            self.frames += 1
            self._measurements_pending += int(to_measure is not None)
            self._frames_seen.notify_all()
            if estimate is None:
                self.rejected += 1
            else:
                self.accepted += 1
                self._last_defocus_um[position] = estimate.defocus_um
                self._window.setdefault(position, deque(maxlen=self.config.window_frames)).append(estimate)
        if to_measure is not None:
            if self._measurer is None:
                self._measurer = threading.Thread(target=self._measure_frames, name="focus-sharpness", daemon=True)
                self._measurer.start()
            self._to_measure.put(to_measure)  # waits only if 4 frames are already waiting to be measured

    def _usable(self, result: FrameResult) -> bool:
        """Whether a frame's estimate may enter the window (its stage Z aside): refocused, finite, confident."""
        return (
            result.refocused
            and math.isfinite(result.defocus_um)
            and (self.config.sign_source == "network" or math.isfinite(result.defocus_magnitude_um))
            and math.isfinite(result.confidence)
            and result.confidence >= self.config.min_confidence
        )

    def _measure_frames(self) -> None:
        """The sharpness thread: measure each queued frame, add it to its position's window."""
        assert self._sharpness is not None
        while (item := self._to_measure.get()) is not None:
            position, t_index, stage_z_um, raw, pixel_size_um = item
            del item
            try:
                sharpness, structure = self._sharpness.measure(raw, pixel_size_um)
                if not structure >= MIN_STRUCTURE_RATIO:  # a blank field: its sharpness is noise's, not focus's
                    with self._lock:
                        self.sharpness_blank += 1
                elif math.isfinite(sharpness) and sharpness > 0:
                    sample = SharpnessSample(stage_z_um, math.log(sharpness), t_index)
                    with self._lock:
                        self.sharpness_measured += 1
                        self._add_sharpness_locked(position, sample)
            except Exception as exc:  # noqa: BLE001 - a frame it cannot measure must not stop the loop; logged
                log.error(kv("focus_sharpness_failed", position=position, error=repr(exc)))
            finally:  # always, or the next plan would wait for a measurement that never comes
                del raw  # do not hold the frame while waiting for the next
                with self._lock:
                    self._measurements_pending -= 1
                    self._frames_seen.notify_all()

    def _add_sharpness_locked(self, position: int, sample: SharpnessSample) -> None:
        samples = self._sharpness_window.setdefault(position, deque(maxlen=_MAX_STACK_PLANES))
        dither_only = bool(samples) and abs(sample.stage_z_um - samples[-1].stage_z_um) <= (
            2 * self.sharpness_dither_um + min_sharpness_span_um(self.sharpness_width_um)
        )
        recent = list(samples)[-self._sharpness_frames :]
        if dither_only and sharpness_jumped(recent, sample, self.sharpness_width_um):
            self.sharpness_restarts += 1
            log.info(
                kv(
                    "focus_sharpness_restart",
                    position=position,
                    stage_z_um=f"{sample.stage_z_um:.3f}",
                    note="sharpness changed more than the Z change explains: focus or field jumped",
                )
            )
            samples.clear()
            self._fine_history.pop(position, None)  # the drift rate from before the jump no longer holds
        samples.append(sample)

    def wait_for_frames(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` results have reached the controller and their sharpness is measured (the closed
        loop waits for the estimates of the frames already taken, not for the slower sinks). False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.frames < count or self._measurements_pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._frames_seen.wait(remaining)
            return True

    def close(self) -> None:
        if self._measurer is not None:
            self._to_measure.put(None)  # after every queued frame
            self._measurer.join()
            self._measurer = None
        log.info(
            kv(
                "focus_summary",
                mode=self.mode,
                sign_source=self.config.sign_source,
                fine_source=self.config.fine_source,
                accepted=self.accepted,
                rejected=self.rejected,
                moves=sum(m.applied for m in self.moves),
                clamps=self.clamps,
                offsets_um=";".join(f"p{p}={o:+.3f}" for p, o in sorted(self._offset_um.items())) or "-",
            )
        )

    # ----------------------------------------------------------------- planning (acquisition thread)
    def offset_um(self, position: int = 0) -> float:
        """The Z offset currently applied at a position (0 in observe mode)."""
        with self._lock:
            return self._offset_um.get(position, 0.0)

    def plan(self, position: int, centre_um: float, t_index: int = 0) -> float:
        """Decide the offset for the next time point at `position` whose planned centre Z is `centre_um`."""
        offset_um = self._plan(position, centre_um, t_index)
        with self._lock:
            history = self._applied_um.setdefault(position, deque(maxlen=_APPLIED_OFFSET_TIME_POINTS))
            history.append((t_index, offset_um))
        return offset_um

    def note_lock_lost(self, position: int, t_index: int) -> None:
        """The hardware focus lock reports it is not engaged: no corrections until it is again."""
        with self._lock:
            self.lock_lost += 1
        log.warning(
            kv(
                "focus_lock_lost",
                position=position,
                t=t_index,
                note="the focus lock is not engaged: corrections stop until it is",
            )
        )

    def restart_offset(self, position: int, t_index: int) -> None:
        """The planned Z of a position moved to where a software autofocus found focus: its offset is 0 again."""
        with self._lock:
            self._offset_um[position] = 0.0
            history = self._applied_um.setdefault(position, deque(maxlen=_APPLIED_OFFSET_TIME_POINTS))
            history.append((t_index, 0.0))
            self._fine_history.pop(position, None)  # fitted focus history was relative to the old plan
            self._held_offset_um.pop(position, None)  # hold start: the plane the autofocus found is the new start
        log.info(kv("focus_offset_restart", position=position, t=t_index, note="software autofocus found focus"))

    def applied_offset_um(self, axes: dict[str, int]) -> float | None:
        """FocusOffsetLookup: the offset `plan` gave the frames of this position and time point (0 in observe
        mode); None when it planned none (no stage Z, the loop off, or more than 16 time points ago)."""
        position, t_index = int(axes.get("p", 0)), int(axes.get("t", 0))
        with self._lock:
            for planned_t, offset_um in reversed(self._applied_um.get(position, ())):
                if planned_t == t_index:
                    return offset_um
        return None

    def _plan(self, position: int, centre_um: float, t_index: int) -> float:
        cfg = self.config
        with self._lock:
            # the sharpness of frames already handed over (normally measured while the acquisition moved on)
            if not self._frames_seen.wait_for(lambda: not self._measurements_pending, timeout=cfg.estimate_wait_s):
                log.warning(
                    kv("focus_sharpness_late", position=position, t=t_index, pending=self._measurements_pending)
                )
            self._centre_um[position] = centre_um
            current = self._offset_um.get(position, 0.0)
            dither = self._next_dither_locked(position)
            located = self._focus_z(position, t_index)
            if located is None:
                return current + dither if self.applies else current
            focus_z_um, source = located
            target_offset_um = cfg.target_offset_um
            if cfg.hold == "start" and source == "sharpness":
                target_offset_um = self._held_offset_locked(position, t_index, centre_um + current - focus_z_um)
            error = focus_z_um + target_offset_um - centre_um - current
            if not math.isfinite(error) or abs(error) <= cfg.dead_band_um:
                return current + dither if self.applies else current
            if cfg.max_step_action == "refuse" and abs(cfg.gain * error) > cfg.max_step_um:
                self.refused += 1
                log.warning(
                    kv(
                        "focus_move_refused",
                        position=position,
                        t=t_index,
                        error_um=f"{error:+.3f}",
                        max_step_um=cfg.max_step_um,
                        source=source,
                    )
                )
                return current + dither if self.applies else current
            step = max(-cfg.max_step_um, min(cfg.max_step_um, cfg.gain * error))
            lo, hi = cfg.z_limits_um
            target = centre_um + current + step
            clamped = not lo <= target <= hi
            new = min(hi, max(lo, target)) - centre_um
            if clamped:
                self.clamps += 1
            move = FocusMove(position, t_index, current, new, error, self.applies, clamped, source)
            self.moves.append(move)
            if self.applies:
                self._offset_um[position] = new
        log.log(
            logging.WARNING if clamped else logging.INFO,
            kv(
                "focus_move" if self.applies else "focus_would_move",
                position=position,
                t=t_index,
                error_um=f"{error:+.3f}",
                step_um=f"{new - current:+.3f}",
                offset_um=f"{new:+.3f}",
                z_um=f"{centre_um + new:.3f}",
                clamped_to_limits=clamped,
                source=source,
            ),
        )
        return new + dither if self.applies else current

    def _held_offset_locked(self, position: int, t_index: int, offset_now_um: float) -> float:
        """focus.hold start: how far from the sharpest plane this position's stack centre is held, learnt at its first
        sharpness fit (`offset_now_um`: where the centre is now, from the sharpest Z that fit found)."""
        if position not in self._held_offset_um:
            self._held_offset_um[position] = offset_now_um
            log.info(
                kv(
                    "focus_hold_learnt",
                    position=position,
                    t=t_index,
                    offset_um=f"{offset_now_um:+.3f}",
                    note="holds this plane: this far from the sharpest one (+: deeper)",
                )
            )
        return self._held_offset_um[position]

    def _next_dither_locked(self, position: int) -> float:
        """fine_source sharpness, correct mode: the Z dither for this time point, alternating sides; none while
        the position's time points are z-stacks of 3 or more planes, whose planes already lie at different Z."""
        if self._sharpness is None or not self.applies or self.sharpness_dither_um == 0:
            return 0.0
        if self._z_planes >= 3 or latest_stack(list(self._sharpness_window.get(position, ()))):
            return 0.0  # the acquisition's z-stacks, or ones it was not told about
        side = -self._dither_side.get(position, -1.0)
        self._dither_side[position] = side
        return side * self.sharpness_dither_um

    def _focus_z(self, position: int, t_index: int) -> tuple[float, str] | None:
        """Where focus is at time point `t_index` and what said so (the docstring of acquire_refocus.focus), None
        when nothing knows; caller holds the lock."""
        cfg = self.config
        window = list(self._window.get(position, ()))
        if self._sharpness is not None:
            near = not window or window[-1].magnitude_um <= self.sharpness_range_um
            samples = self._fit_samples(list(self._sharpness_window.get(position, ())))
            fine_z_um = sharpness_focus_z(samples, self.sharpness_width_um, self.sharpness_range_um)
            if near and fine_z_um is not None:
                return fine_z_um + self.drift_lead_um(position, t_index, fine_z_um), "sharpness"
        if not window:
            return None
        if cfg.sign_source == "network":
            return network_focus_z(window), "network"
        return self._probe_focus_z(position, window), "probe"

    def drift_lead_um(self, position: int, t_index: int, fine_z_um: float) -> float:
        """How far the focus drifts over the sharpness fit's lag: the rate of this position's last fitted focus
        positions (a straight line through up to _DRIFT_FIT_TIME_POINTS of them, from _DRIFT_FIT_MIN on) times
        `sharpness_lead_time_points`. 0 until then, and again after the fitted focus jumps."""
        history = self._fine_history.setdefault(position, deque(maxlen=_DRIFT_FIT_TIME_POINTS))
        if history and abs(fine_z_um - history[-1][1]) > _FOCUS_JUMP_FRACTION_OF_RANGE * self.sharpness_range_um:
            log.info(
                kv(
                    "focus_drift_rate_reset",
                    position=position,
                    t=t_index,
                    jump_um=f"{fine_z_um - history[-1][1]:+.3f}",
                    note="the fitted focus jumped: not drift",
                )
            )
            history.clear()
        history.append((t_index, fine_z_um))
        lead = self.config.sharpness_lead_time_points
        rate_um_per_time_point = drift_rate_um_per_time_point(history) if lead != 0 else None
        return rate_um_per_time_point * lead if rate_um_per_time_point is not None else 0.0

    def _fit_samples(self, samples: list[SharpnessSample]) -> list[SharpnessSample]:
        """What the sharpness fit uses: the latest time point's z-stack when it has 3 or more planes (the planes
        within sharpness_range_um of its sharpest one, where the model holds), else the last `window_frames`
        frames (at least 2)."""
        if stack := latest_stack(samples):
            sharpest = max(stack, key=lambda s: s.log_sharpness)
            return [s for s in stack if abs(s.stage_z_um - sharpest.stage_z_um) <= self.sharpness_range_um]
        return samples[-self._sharpness_frames :]

    def _probe_focus_z(self, position: int, window: list[Estimate]) -> float:
        latest = window[-1]
        if latest.magnitude_um <= self.config.dead_band_um:
            return latest.stage_z_um  # in focus as far as the head can tell
        guess = math.copysign(1.0, latest.defocus_um) if latest.defocus_um != 0 else 1.0
        side = self._side.get(position, guess)
        focus_z_um, ambiguous = probe_focus_z(window, side)
        if not ambiguous:
            self._side[position] = 1.0 if latest.stage_z_um > focus_z_um else -1.0
        log.debug(
            kv(
                "focus_probe",
                position=position,
                focus_z_um=f"{focus_z_um:.3f}",
                ambiguous=ambiguous,
                estimates=len(window),
            )
        )
        return focus_z_um

    def adjust_events(
        self,
        events: Iterable[useq.MDAEvent],
        start_z_um: float | None = None,
        wait_for_estimates: EstimatesWait | None = None,
    ) -> Iterator[useq.MDAEvent]:
        """Yield `events` with each one's Z shifted by its position's offset (correct mode).

        A position's offset is planned when its next time point starts and then held for all of that time
        point's events (a whole z-stack moves together). Events without a Z get `start_z_um` + offset once an
        offset is non-zero. In correct mode, before planning, `wait_for_estimates(estimate_wait_s)` lets the
        pipeline finish the frames already taken, so the move uses the latest estimates.
        """
        planner = EventPlanner(self, wait_for_estimates)
        for event in events:
            nominal = event.z_pos if event.z_pos is not None else start_z_um
            z_um = planner.z_for(event_axes(event), nominal, planned_centre_shift_um(event))
            if z_um is not None and (z_um != nominal or event.z_pos is not None) and z_um != event.z_pos:
                event = event.model_copy(update={"z_pos": z_um})
            yield event

    def state(self) -> dict[str, Any]:
        """For the status command: mode, offsets and last estimates per position, counts."""
        with self._lock:
            return {
                "mode": self.mode,
                "channel": self.channel,
                "actuator": self.config.actuator,
                "sign_source": self.config.sign_source,
                "fine_source": self.config.fine_source,
                "hold": self.config.hold,
                "target_offset_um": self.config.target_offset_um,
                "offsets_um": {str(p): round(o, 4) for p, o in sorted(self._offset_um.items())},
                "last_defocus_um": {str(p): round(d, 4) for p, d in sorted(self._last_defocus_um.items())},
                "estimates_accepted": self.accepted,
                "estimates_rejected": self.rejected,
                "moves": sum(m.applied for m in self.moves),
                "moves_by_source": dict(Counter(m.source for m in self.moves if m.applied)),
                "sharpness_measured": self.sharpness_measured,
                "sharpness_restarts": self.sharpness_restarts,
                "sharpness_blank": self.sharpness_blank,
                "clamps": self.clamps,
                "refused": self.refused,
                "lock_lost": self.lock_lost,
                "other_channel_frames": self.other_channel_frames,
                "positions": self._position_states_locked(),
            }

    def _position_states_locked(self) -> dict[str, dict[str, Any]]:
        """Per position, what the loop knows: its offset, the last move and what located focus."""
        positions = set(self._offset_um) | set(self._sharpness_window) | set(self._window)
        last_move = {m.position: m for m in self.moves}
        states: dict[str, dict[str, Any]] = {}
        for position in sorted(positions):
            move = last_move.get(position)
            states[str(position)] = {
                "offset_um": round(self._offset_um.get(position, 0.0), 4),
                "held_from_sharpest_um": (
                    round(self._held_offset_um[position], 4) if position in self._held_offset_um else None
                ),
                "sharpness_frames": len(self._sharpness_window.get(position, ())),
                "estimates": len(self._window.get(position, ())),
                "last_move_t": move.t_index if move else None,
                "last_error_um": round(move.error_um, 4) if move else None,
                "last_source": move.source if move else None,
            }
        return states
