"""Closed-loop focus: autofocus estimates in, Z offsets for the next time point out.

Each accepted estimate gives an absolute in-focus stage Z for its position: `focus_z = stage_z - defocus`
(Z convention: defocus = stage Z now - stage Z in focus). Because it is absolute, estimates taken before and
after a move can be pooled. Per position, the controller keeps the last `window_frames` of them and, when that
position's next time point starts, plans one move:

    wanted offset = focus Z from the window + target_offset_um - centre Z planned for the position
    error = wanted - current offset;  no move inside the dead band;  step = clamp(gain * error, +-max_step)

The focus Z from the window depends on `sign_source`:

- "network": median(stage_z - defocus), trusting the network's sign.
- "probe": only the unsigned estimates m = |defocus| are used, for optics whose blur looks alike on both sides of
  focus. Each one says focus lies at stage_z - m or stage_z + m; estimates taken at different stage Z single out
  one side: the focus Z that best explains them all (least Huber cost of | |stage_z - f| - m |). While every
  estimate in the window comes from one Z the two sides explain them equally well; the controller then takes the
  side of the network's (weak) sign, or the side that was right last time, and the move itself is the probe: a
  wrong guess doubles the defocus for one time point, and the next estimate, from the new Z, settles the side.

and the new centre (planned centre + offset) is clamped to the soft limits `z_limits_um`, with a log line when
that happens. An estimate that is not finite, has too low a confidence, or belongs to a frame that was not
refocused never reaches the window, so it can never cause a move. Offsets only change at a position's next time
point, so a z-stack is never moved in its middle.

With `fine_source: sharpness`, near focus an image measure that needs no network (`sharpness.py`) takes over from
those estimates. Each frame's band-pass sharpness s, taken at stage Z z, is modelled around the sharpest Z f as

    log s = b - (z - f)^2 / (2 w^2),   w = `sharpness_width_um` (4/3 of the depth of field unless set),

and a position's last `window_frames` frames (or its latest z-stack's planes near the sharpest one) give f by
linear least squares (log s + z^2 / 2w^2 = b + z f / w^2). A wrong w scales the step towards f by (w / true w)^2,
so the loop still settles on f while w is below 1.4 times the true width. The fit is used while the latest network
|defocus| is at most `sharpness_range_um` (or no network estimate passed the gates), and trusted only that far from
the frames' Z. So that frames at different Z exist when nothing moves, in correct mode the stage alternates
+-`sharpness_dither_um` around the focus it holds, one side per time point (a tenth of the depth of field unless
set: 0.3 um for the default optics); not while its time points are z-stacks of 3 or more planes, which already
lie at different Z. The fit lags the focus (its frames lie a time point or more back), so under steady drift the
loop adds the drift over `sharpness_lead_time_points` (1.5 by default, tuned on the simulator), the rate taken
from the fitted focus of the position's last 6 time points; a fitted focus that jumps by more than half of
`sharpness_range_um` starts that rate again (a step is not drift). The sharpest plane is what the loop
holds; in the simulator it lies from 1.2 um shallower to 0.6 um deeper than the nuclei layer's mid-plane (the
simulator's "in focus"), depending on the field (`acquire-refocus calibrate-focus` on 16 fields), and 0.9 um
deeper in the field of the closed-loop tests.
`target_offset_um` holds the stage that far from it instead (at most half of `sharpness_range_um`, where the fit is
trusted); how far the loop really ends up scales with (true width / w)^2.

Channels: only the frames of one channel (`channel`, chosen by `channels.driving_channel` from `focus.channel`)
enter the estimates' window and the sharpness fit; the offset planned from them applies to every channel of
that position and time point. A frame's focus Z is its stage Z minus its channel's Z offset in the sequence.
A move larger than `max_step_um` is split over time points (`max_step_action: split`) or refused (`refuse`).

mode "observe" plans the same moves and logs them ("would move") without applying them: the estimates and
the focus log are there, the stage is left alone. The acquisition hooks apply the offsets (pymmcore-plus:
`hooks.pymmcore_plus.FocusMDAEngine` rewrites each upcoming event's Z; pycromanager: a pre-hardware hook).
"""

from __future__ import annotations

import logging
import math
import queue
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import useq

from acquire_refocus.config import FocusConfig, OpticsConfig
from acquire_refocus.logs import kv
from acquire_refocus.pipeline import FramePipeline, FrameResult
from acquire_refocus.sequence import event_axes
from acquire_refocus.sharpness import MIN_STRUCTURE_RATIO, BandPassSharpness

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


# Probe mode: the focus Z is searched on this grid, and the two sides count as equally likely when their Huber
# costs (um^2 per estimate) differ by less than AMBIGUOUS_COST_UM2.
_PROBE_GRID_UM = 0.05
_PROBE_HUBER_UM = 1.0
AMBIGUOUS_COST_UM2 = 0.1
# Sharpness fit: the frames' Z must span at least this much to say where the peak is. A new frame taken where only
# the dither moved the stage, whose log sharpness is further than _SHARPNESS_JUMP from what the fit predicts,
# shows that focus (or the field) changed suddenly and restarts the fit from it (a 2 um focus step near focus
# changes it by ~0.15, the dither by 0.01-0.05). After a move of the loop it is not checked: far from focus the
# Gaussian model underrates how much sharper the frame gets.
_MIN_SHARPNESS_SPAN_UM = 0.1
_SHARPNESS_JUMP = 0.1
_MAX_STACK_PLANES = 256  # sharpness samples kept per position: room for the planes of one z-stack
_DRIFT_FIT_TIME_POINTS = 6  # drift rate: from the fitted focus of this many recent time points ...
_DRIFT_FIT_MIN = 4  # ... once there are this many
# A fitted focus further than this fraction of sharpness_range_um from the previous one is a jump, not drift (2 um
# for the default optics; the fastest drift tested moves focus 1.2 um per 3-plane time point): the drift rate
# starts again from it, or a step would be extrapolated as drift and overshot.
_FOCUS_JUMP_FRACTION_OF_RANGE = 0.5
_APPLIED_OFFSET_TIME_POINTS = 16  # per position, the offsets handed out that the focus log may still ask about


@dataclass(frozen=True)
class Estimate:
    stage_z_um: float
    defocus_um: float  # signed
    magnitude_um: float  # unsigned


@dataclass(frozen=True)
class SharpnessSample:
    stage_z_um: float
    log_sharpness: float
    t_index: int  # the time point it belongs to: the planes of one z-stack share it


def _gaussian_fit(samples: list[SharpnessSample], width_um: float) -> tuple[float, float, float] | None:
    """(mean Z, mean of u, slope) of u = log s + z^2 / 2w^2 against z; None without enough Z spread."""
    z = np.array([s.stage_z_um for s in samples])
    if len(samples) < 2 or np.ptp(z) < _MIN_SHARPNESS_SPAN_UM:
        return None
    u = np.array([s.log_sharpness for s in samples]) + z**2 / (2 * width_um**2)
    dz = z - z.mean()
    return float(z.mean()), float(u.mean()), float((dz * (u - u.mean())).sum() / (dz**2).sum())


def sharpness_focus_z(samples: list[SharpnessSample], width_um: float, range_um: float) -> float | None:
    """The sharpest stage Z under the Gaussian model (module docstring), clamped to `range_um` from the samples'
    mean Z; None while the samples' Z span less than `_MIN_SHARPNESS_SPAN_UM`."""
    fit = _gaussian_fit(samples, width_um)
    if fit is None:
        return None
    z_mean, _, slope = fit
    return float(min(z_mean + range_um, max(z_mean - range_um, slope * width_um**2)))


def sharpness_jumped(samples: list[SharpnessSample], new: SharpnessSample, width_um: float) -> bool:
    """Whether `new` is further from the fit of `samples` than _SHARPNESS_JUMP (in log sharpness)."""
    fit = _gaussian_fit(samples, width_um)
    if fit is None:
        return False
    z_mean, u_mean, slope = fit
    predicted = u_mean + slope * (new.stage_z_um - z_mean) - new.stage_z_um**2 / (2 * width_um**2)
    return abs(new.log_sharpness - predicted) > _SHARPNESS_JUMP


def _latest_stack(samples: list[SharpnessSample]) -> list[SharpnessSample]:
    """The latest time point's samples when they are a z-stack (3 or more distinct Z), else []."""
    stack = [s for s in samples if s.t_index == samples[-1].t_index] if samples else []
    return stack if len({round(s.stage_z_um, 3) for s in stack}) >= 3 else []


def _huber_cost(residual_um: np.ndarray) -> np.ndarray:
    small = np.abs(residual_um) <= _PROBE_HUBER_UM
    return np.where(small, 0.5 * residual_um**2, _PROBE_HUBER_UM * (np.abs(residual_um) - 0.5 * _PROBE_HUBER_UM))


def probe_focus_z(estimates: list[Estimate], side_guess: float) -> tuple[float, bool]:
    """The focus Z that best explains unsigned estimates taken at various stage Z, and whether the two sides of
    the latest Z explained them equally well (then `side_guess`, +1 or -1, the assumed sign of the latest
    defocus, picks the side)."""
    z = np.array([e.stage_z_um for e in estimates])
    m = np.array([e.magnitude_um for e in estimates])
    grid = np.arange(z.min() - m.max() - 1.0, z.max() + m.max() + 1.0 + _PROBE_GRID_UM, _PROBE_GRID_UM)
    cost = _huber_cost(np.abs(z[None, :] - grid[:, None]) - m[None, :]).mean(axis=1)
    latest = z[-1]
    above, below = grid >= latest, grid <= latest  # focus above the latest Z means its defocus is negative
    best_above = int(np.flatnonzero(above)[np.argmin(cost[above])])
    best_below = int(np.flatnonzero(below)[np.argmin(cost[below])])
    if abs(cost[best_above] - cost[best_below]) < AMBIGUOUS_COST_UM2:
        return float(grid[best_below] if side_guess > 0 else grid[best_above]), True
    best = best_above if cost[best_above] < cost[best_below] else best_below
    return float(grid[best]), False


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
        self.config = config
        self._z_planes = z_planes
        self.channel = channel
        optics = (optics or OpticsConfig()).for_channel(channel)
        self._sharpness = BandPassSharpness.for_optics(optics) if config.fine_source == "sharpness" else None
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
        stage_z_um = result.info.stage_z_um
        if stage_z_um is not None:
            stage_z_um -= result.info.channel_z_offset_um  # the focus Z this frame's sharpness and estimate belong to
        has_z = stage_z_um is not None and math.isfinite(stage_z_um)
        # sharpness (fine_source sharpness): any frame with pixels and a stage Z, refocused or not (skipped frames
        # count: the engine need not have seen them), measured in the controller's own thread
        measure = self._sharpness is not None and result.raw is not None and result.status != "failed" and has_z
        usable = (
            result.refocused
            and has_z
            and math.isfinite(result.defocus_um)
            and (self.config.sign_source == "network" or math.isfinite(result.defocus_magnitude_um))
            and math.isfinite(result.confidence)
            and result.confidence >= self.config.min_confidence
        )
        with self._lock:
            self.frames += 1
            self._measurements_pending += int(measure)
            self._frames_seen.notify_all()
            if not usable:
                self.rejected += 1
            else:
                self.accepted += 1
                self._last_defocus_um[position] = result.defocus_um
                window = self._window.setdefault(position, deque(maxlen=self.config.window_frames))
                magnitude_um = abs(result.defocus_magnitude_um)
                window.append(Estimate(float(stage_z_um), result.defocus_um, magnitude_um))  # type: ignore[arg-type]
        if measure:
            if self._measurer is None:
                self._measurer = threading.Thread(target=self._measure_frames, name="focus-sharpness", daemon=True)
                self._measurer.start()
            z_um = float(stage_z_um)  # type: ignore[arg-type]  # has_z: not None
            frame = (position, int(result.info.axes.get("t", 0)), z_um, result.raw, result.info.pixel_size_um)
            self._to_measure.put(frame)  # waits only if 4 frames are already waiting to be measured

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
            except Exception as exc:  # a frame it cannot measure must not stop the loop
                log.error(kv("focus_sharpness_failed", position=position, error=repr(exc)))
            finally:  # always, or the next plan would wait for a measurement that never comes
                raw = None  # do not hold the frame while waiting for the next
                with self._lock:
                    self._measurements_pending -= 1
                    self._frames_seen.notify_all()

    def _add_sharpness_locked(self, position: int, sample: SharpnessSample) -> None:
        samples = self._sharpness_window.setdefault(position, deque(maxlen=_MAX_STACK_PLANES))
        dither_only = bool(samples) and abs(sample.stage_z_um - samples[-1].stage_z_um) <= (
            2 * self.sharpness_dither_um + _MIN_SHARPNESS_SPAN_UM
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
            error = focus_z_um + cfg.target_offset_um - centre_um - current
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

    def _next_dither_locked(self, position: int) -> float:
        """fine_source sharpness, correct mode: the Z dither for this time point, alternating sides; none while
        the position's time points are z-stacks of 3 or more planes, whose planes already lie at different Z."""
        if self._sharpness is None or not self.applies or self.sharpness_dither_um == 0:
            return 0.0
        if self._z_planes >= 3 or _latest_stack(list(self._sharpness_window.get(position, ()))):
            return 0.0  # the acquisition's z-stacks, or ones it was not told about
        side = -self._dither_side.get(position, -1.0)
        self._dither_side[position] = side
        return side * self.sharpness_dither_um

    def _focus_z(self, position: int, t_index: int) -> tuple[float, str] | None:
        """Where focus is at time point `t_index` and what said so (see the module docstring), None when nothing
        knows; caller holds the lock."""
        cfg = self.config
        window = list(self._window.get(position, ()))
        if self._sharpness is not None:
            near = not window or window[-1].magnitude_um <= self.sharpness_range_um
            samples = self._fit_samples(list(self._sharpness_window.get(position, ())))
            fine_z_um = sharpness_focus_z(samples, self.sharpness_width_um, self.sharpness_range_um)
            if near and fine_z_um is not None:
                return fine_z_um + self._drift_lead_um(position, t_index, fine_z_um), "sharpness"
        if not window:
            return None
        if cfg.sign_source == "network":
            return statistics.median(e.stage_z_um - e.defocus_um for e in window), "network"
        return self._probe_focus_z(position, window), "probe"

    def _drift_lead_um(self, position: int, t_index: int, fine_z_um: float) -> float:
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
        times = np.array([t for t, _ in history], dtype=float)
        if lead == 0 or len(history) < _DRIFT_FIT_MIN or np.ptp(times) == 0:
            return 0.0
        rate_um_per_time_point = float(np.polyfit(times, [z for _, z in history], 1)[0])
        return rate_um_per_time_point * lead

    def _fit_samples(self, samples: list[SharpnessSample]) -> list[SharpnessSample]:
        """What the sharpness fit uses: the latest time point's z-stack when it has 3 or more planes (the planes
        within sharpness_range_um of its sharpest one, where the model holds), else the last `window_frames`
        frames (at least 2)."""
        if stack := _latest_stack(samples):
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
        wait_for_estimates: Callable[[float], bool] | None = None,
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
                "sharpness_frames": len(self._sharpness_window.get(position, ())),
                "estimates": len(self._window.get(position, ())),
                "last_move_t": move.t_index if move else None,
                "last_error_um": round(move.error_um, 4) if move else None,
                "last_source": move.source if move else None,
            }
        return states


def estimates_waiter(controller: FocusController, pipeline: FramePipeline) -> Callable[[float], bool]:
    """wait(timeout_s): until the controller has the results of every frame submitted so far."""
    return lambda timeout_s: controller.wait_for_frames(pipeline.stats().seen, timeout_s)


class EventPlanner:
    """Per-event Z for one acquisition: plans each position's offset when its next time point starts, holds it
    for the rest of that time point, clamps every Z to the soft limits. Used by the pymmcore-plus engine
    (`FocusController.adjust_events`)."""

    def __init__(self, controller: FocusController, wait_for_estimates: Callable[[float], bool] | None = None) -> None:
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
            if (
                controller.applies
                and self._wait is not None
                and cfg.estimate_wait_s > 0
                and t_index > 0
                and not self._wait(cfg.estimate_wait_s)
            ):
                log.warning(kv("focus_estimates_late", position=position, t=t_index, waited_s=cfg.estimate_wait_s))
            self._held[position] = controller.plan(position, nominal_z_um - relative_z_um, t_index)
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
    controller: FocusController, wait_for_estimates: Callable[[float], bool] | None = None
) -> Callable[[int, float, int], float]:
    """`focus_planner` for `hooks.pycromanager.run_sequence`, called once per position and time point before its
    events run: in correct mode it first waits (at most `estimate_wait_s`) for the estimates of frames already
    taken, then returns the offset to add to every Z of that time point (0 unless the mode is `correct`)."""
    cfg = controller.config

    def plan(position: int, centre_um: float, t_index: int) -> float:
        if (
            controller.applies
            and wait_for_estimates is not None
            and cfg.estimate_wait_s > 0
            and t_index > 0
            and not wait_for_estimates(cfg.estimate_wait_s)
        ):
            log.warning(kv("focus_estimates_late", position=position, t=t_index, waited_s=cfg.estimate_wait_s))
        offset_um = controller.plan(position, centre_um, t_index)
        return offset_um if controller.applies else 0.0

    return plan
