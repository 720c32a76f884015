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
trusted); how far the loop really ends up scales with (true width / w)^2. With z-stacks of 3 or more planes,
`hold: start` keeps instead each position's stack centre at the distance from the sharpest plane that its first
stack measured: the plane the user focused on, for specimens thicker than the depth of field, whose sharpest plane
depends on the field. (From single dithered frames that first fit was off by up to 2 um under drift; the
controller refuses `hold: start` without z-stacks.) The sharpness is measured in the band
`sharpness_band_um` (the optics' resolution unless set; `calibrate-focus` recommends one per specimen: at 60x the
simulated nuclei show focus only in a band five times coarser).

Channels: only the frames of one channel (`channel`, chosen by `channels.driving_channel` from `focus.channel`)
enter the estimates' window and the sharpness fit; the offset planned from them applies to every channel of
that position and time point. A frame's focus Z is its stage Z minus its channel's Z offset in the sequence.
A move larger than `max_step_um` is split over time points (`max_step_action: split`) or refused (`refuse`).

mode "observe" plans the same moves and logs them ("would move") without applying them: the estimates and
the focus log are there, the stage is left alone. The acquisition hooks apply the offsets (pymmcore-plus:
`hooks.pymmcore_plus.FocusMDAEngine` rewrites each upcoming event's Z; pycromanager: a pre-hardware hook).

The package: `estimators` (the fits above: pure functions of a position's estimates and sharpness samples),
`controller` (`FocusController`: the windows, offsets and moves per position, fed by the pipeline) and `planners`
(what the hooks ask once per time point, after waiting for the estimates of the frames already taken).
"""

from acquire_refocus.focus.controller import FocusController, FocusMove
from acquire_refocus.focus.estimators import (
    AMBIGUOUS_COST_UM2,
    Estimate,
    SharpnessSample,
    network_focus_z,
    probe_focus_z,
    sharpness_focus_z,
    sharpness_jumped,
)
from acquire_refocus.focus.planners import (
    EventPlanner,
    channel_z_offset_um,
    estimates_waiter,
    plan_after_estimates,
    planned_centre_shift_um,
    pycromanager_planner,
    relative_z_um,
)

__all__ = [
    "AMBIGUOUS_COST_UM2",
    "Estimate",
    "EventPlanner",
    "FocusController",
    "FocusMove",
    "SharpnessSample",
    "channel_z_offset_um",
    "estimates_waiter",
    "network_focus_z",
    "plan_after_estimates",
    "planned_centre_shift_um",
    "probe_focus_z",
    "pycromanager_planner",
    "relative_z_um",
    "sharpness_focus_z",
    "sharpness_jumped",
]
