"""Percentile intensity normalisation: the network sees frames on a common scale whatever the camera offset,
gain, bit depth or exposure, and its output is mapped back to the frame's own intensity units.

normalised = (frame - low) / (high - low), with low/high the given percentiles of the frame. The same
(offset, scale) pair undoes it exactly (up to float rounding); training targets are normalised with the
*input's* statistics so that the network learns a mapping that commutes with this affine change of units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_LOW_PERCENTILE = 1.0
DEFAULT_HIGH_PERCENTILE = 99.8
# Percentiles of frames larger than this many pixels are taken on a regular subsample: same answer to a fraction
# of an ADU, a tenth of the time on a 2048 x 2048 frame.
_SUBSAMPLE_ABOVE_PX = 512 * 512


@dataclass(frozen=True)
class NormalizationParams:
    """Which percentiles map to 0 and 1. Stored in every checkpoint."""

    low_percentile: float = DEFAULT_LOW_PERCENTILE
    high_percentile: float = DEFAULT_HIGH_PERCENTILE

    def to_dict(self) -> dict[str, float]:
        return {"low_percentile": self.low_percentile, "high_percentile": self.high_percentile}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> NormalizationParams:
        return cls(float(data["low_percentile"]), float(data["high_percentile"]))


@dataclass(frozen=True)
class IntensityScale:
    """The affine map of one frame: normalised = (value - offset) / scale."""

    offset: float
    scale: float

    @property
    def is_degenerate(self) -> bool:
        """True for a constant (or empty) frame: nothing to normalise, nothing to refocus."""
        return not self.scale > 0.0


def frame_scale(frame: np.ndarray, params: NormalizationParams = NormalizationParams()) -> IntensityScale:
    """The offset and scale of `frame` (2-D or more) from its percentiles."""
    values = np.asarray(frame)
    if values.size > _SUBSAMPLE_ABOVE_PX and values.ndim >= 2:
        step = int(np.ceil(np.sqrt(values.size / _SUBSAMPLE_ABOVE_PX)))
        values = values[..., ::step, ::step]
    low, high = np.percentile(values.astype(np.float64, copy=False), [params.low_percentile, params.high_percentile])
    scale = float(high - low)
    if not scale > 0.0:
        # Mostly constant with a few outliers: fall back to the full range before calling it constant.
        low, high = float(np.min(frame)), float(np.max(frame))
        scale = high - low
    return IntensityScale(offset=float(low), scale=float(scale))


def normalize(frame: np.ndarray, intensity: IntensityScale) -> np.ndarray:
    """float32 normalised frame; a degenerate scale maps everything to 0."""
    values = np.asarray(frame, dtype=np.float64)
    if intensity.is_degenerate:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - intensity.offset) / intensity.scale).astype(np.float32)


def denormalize(normalised: np.ndarray, intensity: IntensityScale) -> np.ndarray:
    """Back to the frame's intensity units, float32."""
    values = np.asarray(normalised, dtype=np.float64)
    return (values * intensity.scale + intensity.offset).astype(np.float32)
