"""Physics-informed fusion of the network's image with the raw frame: no gain the optics cannot explain.

A network trained on blurred inputs learns to sharpen and to stretch contrast, and near focus it keeps doing a
little of both (the shipped U-Net made a bright in-focus frame 1.10x more contrasted: -13 dB against a raw frame
whose noise was tiny). Three facts of widefield imaging bound what a refocused frame may be, per spatial frequency f
of the frame (the PSFs at +d and -d nearly agree, so only the unsigned distance |d| is needed):

1. Defocus only attenuates: the in-focus image's amplitude is at most the raw frame's times
   ratio(f) = |OTF_0(f)| / |OTF_|d|(f)|. With the network's own |d| lowered by a margin (its estimate's spread, so
   the bound errs on the generous side), an output amplitude above |raw| x ratio is cut to it. One margin per model
   (magnitude_margin_um), or one per bin of |d| where calibrate-model measured them (model/physics_path.py).
2. Where defocus leaves a frequency nearly intact (ratio ~ 1), the raw frame is the truth plus known noise, and
   the network's image the truth plus its own error. The blend towards the raw frame that minimises the expected
   error has, per frequency, the weight (D - N + C) / D: D the power by which the network departs from the raw
   frame, N the noise power, C the covariance of the network's output with the noise (how much of the noise it
   passes through: 0 for a perfect denoiser, N for the identity), each averaged over a radial frequency band.
   C is measured as in Monte-Carlo SURE (Ramani et al. 2008): the network is run twice more, with and without a small
   known noise probe, on a central window of at most PROBE_WINDOW_PX (so the cost stays near one inference on a
   large frame), and the share of the probe it passes per band scales the frame's own noise. Divided by ratio(f)^2
   so that far from focus (ratio >> 1) the network's image is left as it is. A network that only denoises is
   kept; one that stretches contrast, invents texture or passes the noise on near focus is pulled back. Without
   the probe (no network given) C is taken as 0, the weight of a network that removes all noise.
3. Defocus only attenuates, so the in-focus image holds at least the raw frame's signal power S (its power less
   the noise) in every band, and even the best denoiser keeps S^2 / (S + N) of it. A band where S stands well
   above the noise (ERASED_MIN_SNR) and the network's image keeps under ERASED_SHARE of that has lost real signal,
   and the raw frame is no farther from the truth there whatever |d| is: such a band is the raw frame's, neither
   weighed by 2 (whose blend assumes the network's error independent of the raw frame's, which an erasure is
   not) nor divided by ratio^2 (a head that reads an in-focus frame 3-4 um out would otherwise hand it the
   network). Measured on the OOD suite's bead slide, whose sub-resolution beads the networks wiped out (1-60 % of
   their power kept where S/N was 10-1,800): the shipped model at 1 um -0.22 -> +0.07 dB, a 20x / 0.75 fine-tune
   in focus -7.0 -> 0.0 dB (tools/reports/presets/README.md).

The OTFs come from the model's optics (its weights record them) through the simulator's PSF bank (psf.py, cached
on disk). The noise is measured on the frame itself (model/noise.py: shot noise and read noise). Everything runs
on the frame after the network, in the network's own units and grid, before resampling back.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft
import scipy.sparse

from acquire_refocus.config import OpticsConfig, SimulatorConfig
from acquire_refocus.logs import kv
from acquire_refocus.model.envelope import noise_std
from acquire_refocus.model.noise import NoiseModel, fit_noise_model

if TYPE_CHECKING:
    from acquire_refocus.sim.psf import PsfBank

log = logging.getLogger(__name__)

# |d| margin for models whose training did not measure it: the shipped heads read 2.6-3.9 um at focus.
DEFAULT_MARGIN_UM = 3.0
# The shipped model's training reach (+-35 um), for which the bank has 1 um planes out to 40 um.
SHIPPED_REACH_UM = 35.0
_EXTRA_PLANES = 5  # bank planes beyond the training reach
MARGIN_RANGE_UM = 10.0
MAX_RATIO = 50.0  # beyond this, defocus has erased the frequency: no bound from the raw frame
_OTF_CACHE_ENTRIES = 48
_BANDS = 24  # radial frequency bands over which the network's error power is estimated
_WORKERS = -1
# The noise probe's window, run through the network twice (with and without the probe: reusing the whole frame's
# output cropped let border effects swamp the low bands): 28 % of a 512 px frame's pixels (measured: +24 % per
# Refocuser call on CPU), 2 % of a 2048 px one. The shares it gives agreed with a whole-frame probe's within 0.1
# per band at 192 and 256 px on 512 px frames.
PROBE_WINDOW_PX = 192
_PROBE_SCALE = 0.5  # the probe's std relative to the frame's noise: small enough to stay in the network's linear
# response, large enough to stand above float32 rounding (0.3 and 1.0 gave shares within 0.15 of each other)
_PROBE_SEED = 0x5EED  # one fixed probe: the same frame always fuses to the same image
ERASED_SHARE = 0.5  # of the signal power a denoiser keeps (bound 3); 0.8 cost the membranes 0.3 dB in focus
# bound 3 judges only bands whose signal power is this many times the noise's: at S ~ N, S is mostly the noise
# model's error. Judging from S > N cost dim in-focus frames 0.1 dB (the Wiener path's smoothing taken for an
# erasure); from 4N, a 20x / 0.75 fine-tune still lost 0.41 dB on beads 0.43 um from focus (3N: -0.08 dB, and no
# cell of either model's OOD suite near focus more than 0.05 dB lower than with 4N)
ERASED_MIN_SNR = 3.0


def magnitude_margin_um(estimates_um: Sequence[float], true_um: Sequence[float]) -> float:
    """The margin the bound uses: the 90th percentile of (estimated |d| - true |d|) on held-out frames within
    MARGIN_RANGE_UM of focus, where the bound decides most (further out the ratio is large whatever the margin)."""
    true_abs = np.abs(np.asarray(true_um, dtype=np.float64))
    excess = np.asarray(estimates_um, dtype=np.float64) - true_abs
    near = excess[true_abs <= MARGIN_RANGE_UM]
    return float(max(0.0, np.percentile(near if near.size else excess, 90.0)))


def _band_mean(shape: tuple[int, int], values: np.ndarray) -> np.ndarray:
    """Mean per radial band (_radial_bands) of `values` on the rfft2 grid of a frame of `shape`, float32 (relative
    error ~4e-6): a sparse product with the bands' averaging matrix, 4x faster than np.bincount at 512 px."""
    means: np.ndarray = _band_averaging(shape) @ values.ravel()
    return means


@lru_cache(maxsize=4)
def _band_averaging(shape: tuple[int, int]) -> scipy.sparse.csr_matrix:
    """The (_BANDS x frequencies) matrix whose product with values on the rfft2 grid of `shape` is their mean per
    radial band; computed once a frame shape, since a run's frames share one."""
    band = _radial_bands(shape).ravel()
    counts = np.maximum(np.bincount(band, minlength=_BANDS), 1)
    return scipy.sparse.csr_matrix(
        ((1.0 / counts[band]).astype(np.float32), (band, np.arange(band.size))), shape=(_BANDS, band.size)
    )


@lru_cache(maxsize=4)
def _radial_bands(shape: tuple[int, int]) -> np.ndarray:
    """Index of each rfft2 frequency's radial band (_BANDS bands from 0 to the corner frequency); computed once a
    frame shape, since a run's frames share one."""
    radius = np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :])
    bands: np.ndarray = np.minimum((radius / math.sqrt(0.5) * _BANDS).astype(np.int64), _BANDS - 1)
    bands.flags.writeable = False
    return bands


def bank_mtf(bank: PsfBank, index: int, shape: tuple[int, int]) -> np.ndarray:
    """|OTF| (float32) of plane `index` of a PSF bank on the rfft2 grid of `shape`: the PSF centred at the origin,
    cropped to the frame where it is larger, normalised to a sum of 1."""
    psf = bank.plane(index).astype(np.float64)
    half = psf.shape[0] // 2
    reach_y, reach_x = min(half, (shape[0] - 1) // 2), min(half, (shape[1] - 1) // 2)
    kernel = psf[half - reach_y : half + reach_y + 1, half - reach_x : half + reach_x + 1]
    grid = np.zeros(shape, dtype=np.float64)
    grid[: kernel.shape[0], : kernel.shape[1]] = kernel / kernel.sum()
    grid = np.roll(grid, (-reach_y, -reach_x), axis=(0, 1))
    mtf: np.ndarray = np.abs(scipy.fft.rfft2(grid, workers=_WORKERS)).astype(np.float32)
    return mtf


class OpticalFusion:
    """Fuse a network output with its input frame under the two bounds of the module docstring."""

    def __init__(
        self, optics: OpticsConfig, margin_um: float = DEFAULT_MARGIN_UM, reach_um: float = SHIPPED_REACH_UM
    ) -> None:
        """`reach_um`: the largest |defocus| the model was trained for. The bank's planes scale with it: 1 um apart
        out to 40 um for the shipped +-35 um, 0.17 um apart out to 6.9 um for a 60x model trained over +-6 um
        (1 um planes would be two depths of field apart there, and 40 um of oil-objective PSF a 2,347 px bank)."""
        from acquire_refocus.sim.psf import load_or_compute_psf_bank

        z_step_um = min(1.0, float(reach_um) / SHIPPED_REACH_UM)
        self.margin_um = float(margin_um)
        self.bank, _ = load_or_compute_psf_bank(
            optics,
            max_defocus_um=float(reach_um) + _EXTRA_PLANES * z_step_um,
            z_step_um=z_step_um,
            depth_um=0.0,
            cache_dir=SimulatorConfig().psf_cache_dir,
        )
        self._otf: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        log.info(kv("optical_fusion_ready", margin_um=f"{self.margin_um:.2f}", planes=len(self.bank.defocus_um)))

    def mtf(self, defocus_um: float, shape: tuple[int, int]) -> np.ndarray:
        """|OTF| of the bank plane nearest `defocus_um` on the rfft2 grid of `shape` (PSF centred at the origin,
        cropped to the frame if larger)."""
        index = int(self.bank.index(defocus_um))
        key = (index, *shape)
        with self._lock:  # the software autofocus may run the Refocuser beside the pipeline's worker
            cached = self._otf.pop(key, None)
        if cached is None:
            cached = bank_mtf(self.bank, index, shape)
        with self._lock:
            self._otf[key] = cached
            while len(self._otf) > _OTF_CACHE_ENTRIES:
                self._otf.popitem(last=False)
        return cached

    def __call__(
        self,
        raw: np.ndarray,
        output: np.ndarray,
        magnitude_um: float,
        network: Callable[[np.ndarray], np.ndarray] | None = None,
        margin_um: float | None = None,
    ) -> np.ndarray:
        """The fused image (float32, raw's shape) from the network input `raw` and its output. `network` (input ->
        output, same shape) is run twice more on a window of `raw` to measure how much noise it passes through.
        `margin_um`: the margin for this estimate (None: the model's one margin; physics_path.py calibrates one per
        bin of |d|)."""
        if not math.isfinite(magnitude_um):
            return output
        measured = self.measure(raw)
        return self.image(measured, self.fused_spectrum(raw, measured, output, magnitude_um, network, margin_um))

    def measure(self, raw: np.ndarray) -> MeasuredFrame:
        """What the fusion reads off a raw frame, whatever output it then fuses (physics_path.py fuses two)."""
        mean = float(np.mean(raw))
        observed = scipy.fft.rfft2(np.asarray(raw, dtype=np.float32) - mean, workers=_WORKERS)
        noise = fit_noise_model(raw)
        # never below the typical pixel's noise: in a fluorescence frame most pixels lie below the mean, so the mean
        # variance is at least the median pixel's, and a fit on a central crop that is dimmer than the frame, or too
        # flat for a slope, can fall below it
        noise_power = max(raw.size * max(noise.mean_variance(raw), noise_std(raw) ** 2), 1e-12)
        return MeasuredFrame((int(raw.shape[0]), int(raw.shape[1])), mean, observed, noise, noise_power)

    def fused_spectrum(
        self,
        raw: np.ndarray,
        measured: MeasuredFrame,
        output: np.ndarray,
        magnitude_um: float,
        network: Callable[[np.ndarray], np.ndarray] | None = None,
        margin_um: float | None = None,
        *,
        passed_share: np.ndarray | None = None,
    ) -> np.ndarray:
        """The fused image's rfft2, mean removed (`image` turns it into the image): the module docstring's bound and
        blend of `output` against the raw frame `measured` was read from (`margin_um` as in __call__).
        `passed_share`: the network's `passed_noise_share` on this frame, where a caller fusing one output several
        times (under several margins) measured it once; otherwise it is measured here when `network` is given."""
        shape, observed = measured.shape, measured.observed
        lower_um = max(0.0, float(magnitude_um) - (self.margin_um if margin_um is None else float(margin_um)))
        ratio = np.minimum(self.mtf(0.0, shape) / np.maximum(self.mtf(lower_um, shape), 1e-6), MAX_RATIO)
        estimate = scipy.fft.rfft2(np.asarray(output, dtype=np.float32) - measured.mean, workers=_WORKERS)
        amplitude = np.abs(estimate)
        observed_amplitude = np.abs(observed)
        bound = observed_amplitude * ratio
        estimate *= np.minimum(1.0, bound / np.maximum(amplitude, 1e-12))
        band = _radial_bands(shape)
        departure = _band_mean(shape, np.abs(estimate - observed) ** 2)
        if passed_share is None:
            passed_share = np.zeros(_BANDS) if network is None else passed_noise_share(raw, network, measured.noise)
        noise_power = measured.noise_power
        weight_by_band = np.clip(
            (departure - noise_power * (1.0 - passed_share)) / np.maximum(departure, 1e-12), 0.0, 1.0
        )
        # Where the in-focus OTF is the weaker one (ratio < 1: aberrated high-NA optics, or beyond the in-focus
        # cutoff), defocus has not attenuated the frequency: the in-focus-consistent reference is the raw frame
        # times the ratio, trusted as much as an unattenuated one. Unclipped, 1 / ratio^2 reached 1e8 at 60x / 1.4
        # oil and the blend overshot the raw frame by as much.
        attenuation = np.minimum(ratio, 1.0)
        reference_noise = noise_power * _band_mean(shape, attenuation**2)
        signal = np.maximum(_band_mean(shape, (observed_amplitude * attenuation) ** 2) - reference_noise, 0.0)
        kept = _band_mean(shape, np.minimum(amplitude, bound) ** 2)  # the estimate's power after bound 1
        erased = (signal > ERASED_MIN_SNR * reference_noise) & (
            kept < ERASED_SHARE * signal**2 / (signal + reference_noise)
        )
        weight = weight_by_band[band] / np.maximum(ratio, 1.0) ** 2
        if erased.any():  # bound 3 holds however far from focus (the truth holds more than the reference's signal)
            weight[erased[band]] = 1.0
        weight[0, 0] = 0.0  # the mean is the network's (flux is conserved either way)
        estimate += weight * (observed * attenuation - estimate)
        spectrum: np.ndarray = estimate
        return spectrum

    @staticmethod
    def image(measured: MeasuredFrame, spectrum: np.ndarray) -> np.ndarray:
        """The image (float32) of a fused spectrum of the frame `measured` was read from."""
        fused = scipy.fft.irfft2(spectrum, s=measured.shape, workers=_WORKERS) + measured.mean
        return np.asarray(fused, dtype=np.float32)


@dataclass(frozen=True)
class MeasuredFrame:
    """A raw frame as the fusion reads it: shape, mean, spectrum (mean removed) and noise."""

    shape: tuple[int, int]
    mean: float
    observed: np.ndarray  # rfft2 of the frame minus its mean
    noise: NoiseModel
    noise_power: float  # per-frequency noise power on the rfft2 grid (pixels x mean variance)


def passed_noise_share(raw: np.ndarray, network: Callable[[np.ndarray], np.ndarray], noise: NoiseModel) -> np.ndarray:
    """Per radial band, the share of a noise probe the network passes to its output (C / N of the module
    docstring), measured on the central window of `raw` with a probe of the frame's own noise shape."""
    height, width = min(raw.shape[0], PROBE_WINDOW_PX), min(raw.shape[1], PROBE_WINDOW_PX)
    top, left = (raw.shape[0] - height) // 2, (raw.shape[1] - width) // 2
    window = np.array(raw[top : top + height, left : left + width], dtype=np.float32)  # a copy: raw stays as given
    normal = np.random.default_rng(_PROBE_SEED).standard_normal(window.shape)
    probe = (_PROBE_SCALE * np.sqrt(noise.variance(window)) * normal).astype(np.float32)
    probed, plain = np.asarray(network(window + probe)), np.asarray(network(window))
    if probed.shape != window.shape or plain.shape != window.shape:
        raise ValueError(f"the network returned {plain.shape} for a {window.shape} window; it must keep the shape")
    response = probed - plain
    probe_spectrum = scipy.fft.rfft2(probe, workers=_WORKERS)
    covariance = np.real(scipy.fft.rfft2(response, workers=_WORKERS) * np.conj(probe_spectrum))
    probe_power = _band_mean((height, width), np.abs(probe_spectrum) ** 2)
    passed = _band_mean((height, width), covariance) / np.maximum(probe_power, 1e-12)
    # a non-finite network response says nothing about the noise: such a band is weighed as if none passed
    finite: np.ndarray = np.where(np.isfinite(passed), passed, 0.0)
    return finite
