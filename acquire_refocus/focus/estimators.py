"""Where focus lies, from the frames of one position: pure functions of estimates and measurements, no state.

The network's signed estimates are pooled by their median; its unsigned ones by the probe fit; band-pass sharpness
by the Gaussian fit; the fitted focus of recent time points gives the drift rate. The models and why they hold are
in the docstring of `acquire_refocus.focus`; `FocusController` keeps the windows these functions are given.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Probe mode: the focus Z is searched on this grid, and the two sides count as equally likely when their Huber
# costs (um^2 per estimate) differ by less than AMBIGUOUS_COST_UM2.
_PROBE_GRID_UM = 0.05
_PROBE_HUBER_UM = 1.0
AMBIGUOUS_COST_UM2 = 0.1
# Sharpness fit: the frames' Z must span at least this fraction of the sharpness width to say where the peak is
# (0.1 um for 20x / 0.45 NA, whose width is 4 um; an absolute 0.1 um kept the fit from ever starting at 60x / 1.4,
# whose dither, a tenth of the 0.47 um depth of field, spans 0.094 um). A new frame taken where only
# the dither moved the stage, whose log sharpness is further than _SHARPNESS_JUMP from what the fit predicts,
# shows that focus (or the field) changed suddenly and restarts the fit from it (a 2 um focus step near focus
# changes it by ~0.15, the dither by 0.01-0.05). After a move of the loop it is not checked: far from focus the
# Gaussian model underrates how much sharper the frame gets.
MIN_SHARPNESS_SPAN_FRACTION = 0.025
_SHARPNESS_JUMP = 0.1
_DRIFT_FIT_MIN = 4  # the drift rate is fitted once there are this many time points


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


def min_sharpness_span_um(width_um: float) -> float:
    """The least Z span of frames from which the sharpness fit says where the peak is."""
    return MIN_SHARPNESS_SPAN_FRACTION * width_um


def _gaussian_fit(samples: list[SharpnessSample], width_um: float) -> tuple[float, float, float] | None:
    """(mean Z, mean of u, slope) of u = log s + z^2 / 2w^2 against z; None without enough Z spread."""
    z = np.array([s.stage_z_um for s in samples])
    if len(samples) < 2 or np.ptp(z) < min_sharpness_span_um(width_um):
        return None
    u = np.array([s.log_sharpness for s in samples]) + z**2 / (2 * width_um**2)
    dz = z - z.mean()
    return float(z.mean()), float(u.mean()), float((dz * (u - u.mean())).sum() / (dz**2).sum())


def sharpness_focus_z(samples: list[SharpnessSample], width_um: float, range_um: float) -> float | None:
    """The sharpest stage Z under the Gaussian model (acquire_refocus.focus), clamped to `range_um` from the samples'
    mean Z; None while the samples' Z span less than `min_sharpness_span_um(width_um)`."""
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


def latest_stack(samples: list[SharpnessSample]) -> list[SharpnessSample]:
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


def network_focus_z(window: Iterable[Estimate]) -> float:
    """The focus Z the signed network estimates say, pooled: median(stage_z - defocus), robust to an outlier."""
    return statistics.median(e.stage_z_um - e.defocus_um for e in window)


def drift_rate_um_per_time_point(history: Sequence[tuple[int, float]]) -> float | None:
    """The slope of a straight line through (time point, fitted focus Z); None with fewer than _DRIFT_FIT_MIN
    points or all at one time point."""
    times = np.array([t for t, _ in history], dtype=float)
    if len(history) < _DRIFT_FIT_MIN or np.ptp(times) == 0:
        return None
    return float(np.polyfit(times, [z for _, z in history], 1)[0])
