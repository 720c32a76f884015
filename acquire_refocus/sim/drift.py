"""Focus disturbances: how the in-focus stage Z wanders with time, and a sample tilt across the field.

Every model is a deterministic function of time for a given seed, so frames can be re-rendered at any time in any
order and a run is reproducible. The random walk is a seeded Brownian path sampled on a fine time grid (chunks of
increments, each chunk seeded by its index, so the path does not depend on which times were asked for first) and
linearly interpolated in between.
"""

from __future__ import annotations

import math

import numpy as np

from acquire_refocus.config import DriftConfig

_WALK_DT_S = 0.1
_WALK_CHUNK = 4096


class Drift:
    """drift_um(t_s): offset of the in-focus stage Z from its t=0 value; tilt_um(x, y): offset across the sample."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self._walk_chunks: list[np.ndarray] = []  # cumulative positions at the grid points of each chunk
        self._step_sums: list[float] = [0.0]  # _step_sums[n]: sum of the first n step directions

    def drift_um(self, t_s: float) -> float:
        c = self.config
        t = max(0.0, float(t_s))
        if c.model == "none":
            return 0.0
        if c.model == "linear":
            return c.rate_um_per_min * t / 60.0
        if c.model == "thermal":
            return c.amplitude_um * (1.0 - math.exp(-t / c.time_constant_s))
        if c.model == "steps":
            count = math.floor(t / c.step_interval_s)
            return c.step_um * self._step_total(count)
        return self._random_walk(t)

    def tilt_um(self, x_um: float | np.ndarray, y_um: float | np.ndarray) -> float | np.ndarray:
        """Offset of the in-focus stage Z at sample position (x, y) um, relative to the stage origin."""
        return (
            self.config.tilt_x_um_per_mm * np.asarray(x_um) + self.config.tilt_y_um_per_mm * np.asarray(y_um)
        ) / 1000.0

    @property
    def has_tilt(self) -> bool:
        return self.config.tilt_x_um_per_mm != 0.0 or self.config.tilt_y_um_per_mm != 0.0

    def _step_total(self, count: int) -> float:
        """Sum of the directions (+1 / -1, seeded per step) of the first `count` steps: focus jumps both ways."""
        while len(self._step_sums) <= count:
            step = len(self._step_sums) - 1
            rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0x57E9, step]))
            self._step_sums.append(self._step_sums[-1] + (1.0 if rng.random() < 0.5 else -1.0))
        return self._step_sums[count]

    def _random_walk(self, t: float) -> float:
        position = t / _WALK_DT_S
        index = math.floor(position)
        chunk, offset = divmod(index, _WALK_CHUNK)
        while len(self._walk_chunks) <= chunk:
            self._extend_walk()
        path = self._walk_chunks[chunk]
        frac = position - index
        return float(path[offset] * (1.0 - frac) + path[offset + 1] * frac)

    def _extend_walk(self) -> None:
        chunk = len(self._walk_chunks)
        start = float(self._walk_chunks[-1][-1]) if self._walk_chunks else 0.0
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0x3A1C, chunk]))
        steps = rng.standard_normal(_WALK_CHUNK) * (self.config.random_walk_um_per_sqrt_s * math.sqrt(_WALK_DT_S))
        self._walk_chunks.append(np.concatenate(([start], start + np.cumsum(steps))))
