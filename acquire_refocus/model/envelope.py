"""Is a frame inside what the model was trained on? Flags for frames a model should not answer confidently.

A network answers every frame, including a saturated one, an empty field or a brightness it never saw, and it
answers with the confidence it learnt on its training data. These checks are cheap (percentiles and pixel
differences on a subsample) and run on every frame:

- ``saturated``: more than SATURATED_FRACTION of the pixels at the integer type's maximum;
- ``nearly_empty``: the frame's signal range is under EMPTY_SNR times its noise (nothing to refocus or focus on);
- ``brightness_outside_envelope``: the frame's signal-to-noise ratio lies outside the range measured on the
  model's own validation frames at training time (`snr_range` in the weights' metadata), widened by
  SNR_MARGIN either way; models without that record are not judged on it;
- ``pixel_size_outside_envelope``: the frame is resampled by more than MAX_ZOOM to the model's pixel size.

A flagged frame is still refocused and published, but its confidence is 0, so the closed loop never moves on it,
and the flags are logged (focus.csv, the `focus` message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SATURATED_FRACTION = 1e-3
EMPTY_SNR = 4.5  # camera noise alone measures 3.4; the default simulator at 40 um defocus 5.9
SNR_MARGIN = 2.0
MAX_ZOOM = 2.0
_SUBSAMPLE_PX = 512 * 512
_NOISE_CROP_PX = 512  # the noise is measured on neighbouring pixels of a central crop, whatever the frame size
# Flags that make the focus estimate untrustworthy (confidence 0).
DISTRUSTED = frozenset({"saturated", "nearly_empty", "brightness_outside_envelope", "pixel_size_outside_envelope"})


def noise_std(frame: np.ndarray) -> float:
    """Robust per-pixel noise: the median absolute difference of horizontal neighbours, scaled to a Gaussian std
    (differences of two independent pixels have sqrt(2) times the pixel std), on a central crop. Structure barely
    moves it, since most neighbouring pixels of a micrograph differ by noise alone."""
    values = np.asarray(frame)
    height, width = values.shape[-2:]
    top, left = max(0, (height - _NOISE_CROP_PX) // 2), max(0, (width - _NOISE_CROP_PX) // 2)
    crop = values[..., top : top + _NOISE_CROP_PX, left : left + _NOISE_CROP_PX].astype(np.float32)
    differences = np.abs(np.diff(crop, axis=-1))
    return float(1.4826 * np.median(differences) / math.sqrt(2.0))


def signal_to_noise(frame: np.ndarray) -> float:
    """(99.9th percentile - median) / noise_std: how far the brightest structures stand above the noise."""
    values = np.asarray(frame, dtype=np.float32)
    step = max(1, math.ceil(math.sqrt(values.size / _SUBSAMPLE_PX)))
    sample = values[::step, ::step]
    high, middle = np.percentile(sample, [99.9, 50.0])
    noise = noise_std(values)
    if noise <= 0:
        # quantised, nearly noiseless data (e.g. a rendered image): the range alone decides emptiness
        return math.inf if high > middle else 0.0
    return float((high - middle) / noise)


def envelope_flags(frame: np.ndarray, zoom: float, snr_range: Sequence[float] | None) -> tuple[str, ...]:
    flags = []
    if frame.dtype.kind == "u":
        top = np.iinfo(frame.dtype).max
        if np.count_nonzero(frame == top) > SATURATED_FRACTION * frame.size:
            flags.append("saturated")
    snr = signal_to_noise(frame)
    if snr < EMPTY_SNR:
        flags.append("nearly_empty")
    elif snr_range is not None and not (snr_range[0] / SNR_MARGIN <= snr <= snr_range[1] * SNR_MARGIN):
        flags.append("brightness_outside_envelope")
    if not 1.0 / MAX_ZOOM <= zoom <= MAX_ZOOM:
        flags.append("pixel_size_outside_envelope")
    return tuple(flags)


def measured_snr_range(frames: Sequence[np.ndarray]) -> tuple[float, float]:
    """The 1st and 99th percentile of the frames' signal-to-noise ratios (what training saw)."""
    values = [signal_to_noise(f) for f in frames]
    finite = [v for v in values if math.isfinite(v)]
    low, high = np.percentile(finite, [1.0, 99.0]) if finite else (0.0, math.inf)
    return float(low), float(high)
