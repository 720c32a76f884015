"""The classical baselines of the evaluation: Richardson-Lucy and Wiener deconvolution with the true PSF at the true
defocus, taken from the simulator's PSF bank (a classical method with perfect knowledge of the blur), the Wiener
balance tuned per |defocus| on a validation specimen.

Deconvolution estimates the object, while the ground truth is the in-focus image (object convolved with the
in-focus PSF), so both deconvolutions are re-blurred with the in-focus PSF before scoring (without it they would be
penalised for sharpening beyond the in-focus image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from acquire_refocus.config import AppConfig
from acquire_refocus.logs import kv
from acquire_refocus.model.data import VALIDATION_SEED_BASE, MicroscopeCache, simulated_fields
from acquire_refocus.model.held_out import HeldOutSet, Sample, crop_psf

log = logging.getLogger(__name__)

RL_ITERATIONS = 30
WIENER_BALANCES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)

Method = Callable[[Sample], tuple[np.ndarray, float, float]]  # -> (image in ADU, estimate_um, sigma_um)


def deconvolve(
    sample: Sample, psf: np.ndarray, in_focus_psf: np.ndarray, offset_adu: float, algorithm: str, balance: float = 0.0
) -> np.ndarray:
    """Deconvolve in photon-like units (offset removed, scaled to ~[0, 1]), reflect-padded by the PSF radius so
    the frame edge does not ring; then re-blur with the in-focus PSF, because the ground truth is the in-focus
    *image* (object convolved with the in-focus PSF), not the object; crop and map back to ADU."""
    from scipy.signal import fftconvolve
    from skimage.restoration import richardson_lucy, wiener

    image = np.clip(sample.raw.astype(np.float64) - offset_adu, 0.0, None)
    scale = max(float(image.max()), 1.0)
    pad = max(psf.shape[0], in_focus_psf.shape[0]) // 2
    padded = np.pad(image / scale, pad, mode="reflect")
    if algorithm == "richardson_lucy":
        restored = richardson_lucy(padded, psf, num_iter=RL_ITERATIONS, clip=False)
    else:
        restored = wiener(padded, psf, balance, clip=False)
    restored = fftconvolve(restored, in_focus_psf, mode="same")
    restored = restored[pad : pad + image.shape[0], pad : pad + image.shape[1]]
    image_adu: np.ndarray = (restored * scale + offset_adu).astype(np.float32)  # skimage and scipy are untyped
    return image_adu


def tune_wiener_balance(config: AppConfig, distances_um: Sequence[float], window_px: int) -> dict[int, float]:
    """The Wiener balance (regularisation) that maximises PSNR at each |defocus|, chosen on a validation field
    (specimen seed VALIDATION_SEED_BASE), never on the test set."""
    scopes = MicroscopeCache(config.optics, config.simulator, keep=1)
    field = simulated_fields(1, VALIDATION_SEED_BASE, config.simulator.specimen.field_size_um)[0]
    scope = scopes.get(field.seed)
    signed = sorted({s * d for d in distances_um for s in (-1.0, 1.0)})
    rng = np.random.default_rng(np.random.SeedSequence([0, 0x3E1]))
    planes, truth = scope.render_stack(signed, (field.x_um, field.y_um), rng=rng, shape_px=(window_px, window_px))
    bank = scope.psf_bank
    in_focus = crop_psf(bank.plane(int(bank.index(0.0))).astype(np.float64))
    offset = config.simulator.camera.offset_adu
    data_range = float(truth.max() - truth.min())
    chosen: dict[int, float] = {}
    for distance in sorted({round(abs(d)) for d in signed}):
        scores = {}
        for balance in WIENER_BALANCES:
            values = []
            for plane, d in zip(planes, signed, strict=True):
                if round(abs(d)) != distance:
                    continue
                sample = Sample("tuning", "flat", d, plane, truth)
                psf = crop_psf(bank.plane(int(bank.index(d))).astype(np.float64))
                image = deconvolve(sample, psf, in_focus, offset, "wiener", balance)
                values.append(peak_signal_noise_ratio(truth, image, data_range=data_range))
            scores[balance] = float(np.mean(values))
        chosen[distance] = max(scores, key=lambda balance: scores[balance])
    log.info(kv("wiener_balance_tuned", **{f"d{d}": b for d, b in chosen.items()}))
    return chosen


def baseline_methods(test_set: HeldOutSet, wiener_balance: dict[int, float]) -> dict[str, Method]:
    offset = test_set.config.simulator.camera.offset_adu
    in_focus = test_set.true_psf(0.0)

    def unprocessed(sample: Sample) -> tuple[np.ndarray, float, float]:
        return sample.raw.astype(np.float32), math.nan, math.nan

    def richardson_lucy(sample: Sample) -> tuple[np.ndarray, float, float]:
        psf = test_set.true_psf(sample.defocus_um)
        return deconvolve(sample, psf, in_focus, offset, "richardson_lucy"), math.nan, math.nan

    def wiener(sample: Sample) -> tuple[np.ndarray, float, float]:
        distance = min(wiener_balance, key=lambda d: abs(d - abs(sample.defocus_um)))
        psf = test_set.true_psf(sample.defocus_um)
        return deconvolve(sample, psf, in_focus, offset, "wiener", wiener_balance[distance]), math.nan, math.nan

    return {
        "input (unprocessed)": unprocessed,
        f"Richardson-Lucy, true PSF ({RL_ITERATIONS} it.)": richardson_lucy,
        "Wiener, true PSF, tuned balance": wiener,
    }
