"""An image-sharpness focus measure, for fine focus within the depth of field.

Why: a single frame tells the autofocus head roughly how far from focus it is, but near focus the shipped head
cannot resolve better than ~2.3 um (tools/reports/default-model/README.md), while the depth of field of the
default optics is 3 um. Relative measurements can: the same field imaged at two stage Z a fraction of a micrometre
apart is measurably sharper at the one nearer focus. The closed loop (`focus.fine_source: sharpness`) compares
frames of one position taken at different Z.

The measure is the power of the frame in a band of spatial frequencies below the optics' cutoff (a difference of
Gaussians, 0.8 and 2.1 times the Rayleigh resolution 0.61 lambda / NA), divided by the squared mean, so it does
not depend on brightness or exposure. Defocus removes the band's power first; white camera noise is mostly above
it. On the default optics and specimen it falls by 10% at 2 um and 40% at 4 um from its peak, and repeats to 0.8%
between frames (photon noise). It is computed with one FFT of a central crop of at most `crop_px` square
(1-2 ms for 512 x 512 on one core), so the whole 2048 x 2048 frame is never transformed.

The band's scale defaults to the optics' resolution (`focus.sharpness_band_um` sets another). At high NA a
specimen may have no detail that fine: at 60x / 1.4 NA oil the simulated nuclei, textured down to 0.5 um, leave
mostly camera noise in the 0.16-0.42 um band, and in the 3 of 8 fields with nuclei their log sharpness changes by
0.05-0.5 over +-5 um, where a band five times coarser changes by 1.5-3. `acquire-refocus calibrate-focus` tries
several scales on the user's z-stacks and recommends one (its --help says how).

The same FFT says whether the frame has structure at all (`measure`): the band's power per frequency against the
power near the Nyquist frequency (0.4-0.5 cycles per pixel), where white camera and photon noise dominate. A blank
field reads 1.00 +- 0.01 on the simulator; the default field reads 5.2 in focus, 1.8 at 8 um and 1.2 at 15 um from
it. Below `MIN_STRUCTURE_RATIO` the closed loop leaves a frame out of its sharpness fit: noise alone would place
focus anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import scipy.fft

from acquire_refocus.config import OpticsConfig

# Band edges as multiples of the Rayleigh resolution: chosen on the simulated default optics (20x / 0.45 NA,
# 0.325 um pixels: 1.5 and 4 px); scaled with the optics and the pixel size for others.
_FINE_SIGMA_RESOLUTIONS = 0.8
_COARSE_SIGMA_RESOLUTIONS = 2.1
DEFAULT_CROP_PX = 512
MIN_STRUCTURE_RATIO = 1.1  # band power per frequency over the noise's: 10% above white noise alone
_NOISE_BAND_CYCLES_PER_PX = (0.4, 0.5)


def resolution_um(optics: OpticsConfig) -> float:
    """The Rayleigh resolution 0.61 lambda / NA: the default scale of the sharpness band."""
    return 0.61 * optics.emission_wavelength_nm * 1e-3 / optics.numerical_aperture


@lru_cache(maxsize=8)
def _band_weights(shape: tuple[int, int], fine_sigma_px: float, coarse_sigma_px: float) -> npt.NDArray[np.float32]:
    """|DoG transfer function|^2 on the rfft2 grid of `shape`."""
    ky = scipy.fft.fftfreq(shape[0])[:, None]
    kx = scipy.fft.rfftfreq(shape[1])[None, :]
    k2 = kx**2 + ky**2
    transfer = np.exp(-2 * math.pi**2 * k2 * fine_sigma_px**2) - np.exp(-2 * math.pi**2 * k2 * coarse_sigma_px**2)
    weights: npt.NDArray[np.float32] = (transfer**2).astype(np.float32)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=8)
def _noise_band(shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Mask of the rfft2 grid of `shape` between _NOISE_BAND_CYCLES_PER_PX (where only noise is left)."""
    k = np.hypot(scipy.fft.fftfreq(shape[0])[:, None], scipy.fft.rfftfreq(shape[1])[None, :])
    mask: npt.NDArray[np.bool_] = (k > _NOISE_BAND_CYCLES_PER_PX[0]) & (k < _NOISE_BAND_CYCLES_PER_PX[1])
    mask.setflags(write=False)
    return mask


class BandPassSharpness:
    """sharpness(frame, pixel_size_um) -> float: band-pass power / mean^2 of a central crop (larger is sharper).

    Comparable between frames of the same field only; NaN for a frame it cannot measure (not 2-D, too small,
    non-finite, or no light).
    """

    def __init__(self, resolution_um: float, pixel_size_um: float, crop_px: int = DEFAULT_CROP_PX) -> None:
        if resolution_um <= 0 or pixel_size_um <= 0:
            raise ValueError("resolution_um and pixel_size_um must be positive")
        self.resolution_um = float(resolution_um)
        self.pixel_size_um = float(pixel_size_um)
        self.crop_px = int(crop_px)

    @classmethod
    def for_optics(
        cls, optics: OpticsConfig, band_um: float | None = None, crop_px: int = DEFAULT_CROP_PX
    ) -> BandPassSharpness:
        """The band at `band_um` (`focus.sharpness_band_um`), or at the optics' resolution when None."""
        return cls(resolution_um(optics) if band_um is None else band_um, optics.pixel_size_um, crop_px)

    def __call__(self, frame: np.ndarray, pixel_size_um: float | None = None) -> float:
        return self.measure(frame, pixel_size_um)[0]

    def measure(self, frame: np.ndarray, pixel_size_um: float | None = None) -> tuple[float, float]:
        """(sharpness, structure ratio): the ratio of the band's power per frequency to that near Nyquist (about 1
        for a field of noise alone); both NaN for a frame it cannot measure."""
        if frame.ndim != 2 or min(frame.shape) < 16:
            return math.nan, math.nan
        height, width = frame.shape
        crop_h, crop_w = min(height, self.crop_px), min(width, self.crop_px)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        crop = np.asarray(frame[top : top + crop_h, left : left + crop_w], dtype=np.float32)
        pixel_um = pixel_size_um if pixel_size_um and pixel_size_um > 0 else self.pixel_size_um
        sigma_px = self.resolution_um / pixel_um
        weights = _band_weights(
            (crop_h, crop_w),
            round(_FINE_SIGMA_RESOLUTIONS * sigma_px, 3),
            round(_COARSE_SIGMA_RESOLUTIONS * sigma_px, 3),
        )
        spectrum = scipy.fft.rfft2(crop)
        power = spectrum.real**2 + spectrum.imag**2
        total = float(np.abs(spectrum[0, 0]))
        if not math.isfinite(total) or total <= 0:
            return math.nan, math.nan
        band = float((power * weights).sum())
        weight_sum = float(weights.sum())
        if not math.isfinite(band) or not weight_sum > 0:  # no frequency of this crop lies in the band
            return math.nan, math.nan
        noise = float(power[_noise_band(crop.shape)].mean())
        structure = (band / weight_sum) / noise if noise > 0 else math.inf
        return band / total**2, structure


@dataclass(frozen=True)
class SharpnessCurve:
    """Where the sharpness of a z-stack peaks and how fast it falls: log s = c - (z - peak)^2 / (2 width^2)."""

    peak_z_um: float
    width_um: float
    planes_used: int
    residual_rms: float  # of log sharpness about the fit, per degree of freedom (0 with only 3 planes)


def fit_sharpness_curve(z_um: np.ndarray, log_sharpness: np.ndarray, range_um: float) -> SharpnessCurve | None:
    """Least-squares parabola in log sharpness over the planes within `range_um` of the sharpest one (where the
    Gaussian model holds), for calibrating the closed loop's `sharpness_width_um`. None when fewer than 3 such
    planes are finite or the parabola opens upwards (no peak: an empty field, or a stack that misses focus)."""
    z = np.asarray(z_um, dtype=float)
    s = np.asarray(log_sharpness, dtype=float)
    finite = np.isfinite(s) & np.isfinite(z)
    if finite.sum() < 3:
        return None
    z, s = z[finite], s[finite]
    near = np.abs(z - z[int(np.argmax(s))]) <= range_um
    if near.sum() < 3:
        return None
    coefficients = np.polyfit(z[near], s[near], 2)
    curvature, slope, _ = coefficients
    if not curvature < 0:
        return None
    squared = float(np.sum((np.polyval(coefficients, z[near]) - s[near]) ** 2))
    residual_rms = math.sqrt(squared / max(int(near.sum()) - 3, 1))
    return SharpnessCurve(
        float(-slope / (2 * curvature)), float(math.sqrt(-1 / (2 * curvature))), int(near.sum()), residual_rms
    )
