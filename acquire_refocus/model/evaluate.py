"""Evaluate refocus networks against the raw input and deconvolution baselines on held-out simulated specimens.

Test data: specimens with seeds from TEST_SEED_BASE (never used for training or validation), several fields of
view each, rendered at fixed signed defocus distances with camera noise, plus an unseen setting: the same kind of
frames from a *tilted* sample (the defocus varies across the frame; the network never saw tilt in training).

Methods: the unprocessed input; Richardson-Lucy deconvolution with the true PSF at the true defocus (taken from the
simulator's PSF bank: a classical method with perfect knowledge of the blur); Wiener deconvolution with the same
true PSF and its balance tuned per |defocus| on a validation specimen; each network given (through Refocuser,
PyTorch engine, FP32). Deconvolution estimates the object, while the ground truth is the in-focus image (object
convolved with the in-focus PSF), so both deconvolutions are re-blurred with the in-focus PSF before scoring
(without it they would be penalised for sharpening beyond the in-focus image).

Metrics (skimage.metrics) against the noiseless in-focus ground truth, in ADU, with
data_range = max(truth) - min(truth) of each frame: PSNR (dB) and SSIM. Defocus: mean absolute error of the
network's estimate and the share of correct signs for |d| >= 3 um.
"""

from __future__ import annotations

import csv
import logging
import math
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from acquire_refocus.config import AppConfig, EngineConfig
from acquire_refocus.logs import kv
from acquire_refocus.model.data import (
    TEST_SEED_BASE,
    VALIDATION_SEED_BASE,
    Field,
    MicroscopeCache,
    simulated_fields,
)
from acquire_refocus.outputs import output_folder

log = logging.getLogger(__name__)

# The head-to-tail paper's Table 2 columns (34/28/22/16/10 um) and closer distances, both signs.
DEFAULT_DISTANCES_UM = (34.0, 28.0, 22.0, 16.0, 10.0, 5.0, 2.0, 1.0, 0.0)
TILT_DISTANCES_UM = (22.0, 10.0, 2.0)
TILT_UM_PER_MM = 40.0
SIGN_MIN_UM = 3.0
RL_ITERATIONS = 30
WIENER_BALANCES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
EMPTY_FIELD_CONTRAST = 0.25
PAPER_BBBC006 = {
    "input": {34: 32.05, 28: 32.42, 22: 32.92, 16: 33.73, 10: 35.40},
    "head-to-tail network": {34: 34.55, 28: 35.69, 22: 36.35, 16: 37.99, 10: 40.86},
}


@dataclass
class Sample:
    """One test frame."""

    field: str
    setting: str  # "flat" or "tilt"
    defocus_um: float  # true defocus (at the frame centre for tilted frames)
    raw: np.ndarray  # uint16
    truth: np.ndarray  # float32 ADU


@dataclass
class Row:
    method: str
    setting: str
    field: str
    defocus_um: float
    psnr_db: float
    ssim: float
    estimate_um: float  # NaN for methods without a defocus estimate
    sigma_um: float
    seconds: float
    magnitude_um: float = math.nan  # the focus head's |d| factor (networks only)
    p_positive: float = math.nan  # the focus head's P(d > 0) (networks only)


Method = Callable[[Sample], tuple[np.ndarray, float, float]]  # -> (image in ADU, estimate_um, sigma_um)


def _crop_psf(psf: np.ndarray, energy: float = 0.999) -> np.ndarray:
    """The smallest centred square holding `energy` of the PSF, renormalised: same result, much faster FFTs."""
    n = psf.shape[0]
    centre = n // 2
    total = float(psf.sum())
    for half in range(4, centre + 1, 4):
        window = psf[centre - half : centre + half + 1, centre - half : centre + half + 1]
        if window.sum() >= energy * total:
            return window / window.sum()
    return psf / total


def _deconvolve(
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
    return (restored * scale + offset_adu).astype(np.float32)


class HeldOutSet:
    """Held-out test frames and access to the true PSFs of the simulator that made them."""

    def __init__(
        self,
        config: AppConfig,
        fields: int,
        window_px: int,
        distances_um: Sequence[float],
        tilt_distances_um: Sequence[float],
        seed: int = 0,
    ) -> None:
        self.config = config
        self.scopes = MicroscopeCache(config.optics, config.simulator, keep=1)
        self.fields = self._fields_with_cells(fields, window_px)
        signed = sorted({s * d for d in distances_um for s in (-1.0, 1.0)})
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
        self.samples: list[Sample] = []
        self._tilted_scope: tuple[int, object] | None = None
        shape = (window_px, window_px)
        for field in self.fields:
            scope = self.scopes.get(field.seed)
            name = f"seed{field.seed}_x{field.x_um:g}_y{field.y_um:g}"
            planes, truth = scope.render_stack(signed, (field.x_um, field.y_um), rng=rng, shape_px=shape)
            self.samples += [Sample(name, "flat", d, planes[i], truth) for i, d in enumerate(signed)]
            if tilt_distances_um:
                self.samples += self._tilted(field, name, tilt_distances_um, truth, shape, rng)
        self.bank = scope.psf_bank
        self._tilted_scope = None

    def _fields_with_cells(self, count: int, window_px: int) -> list[Field]:
        """The first `count` test fields whose in-focus image shows cells: an empty field has a constant truth,
        for which PSNR is meaningless. A field counts as empty when its in-focus contrast (max - min) is below
        EMPTY_FIELD_CONTRAST of the best candidate's."""
        candidates = simulated_fields(count * 3, TEST_SEED_BASE, self.config.simulator.specimen.field_size_um)
        contrast = []
        for field in candidates:
            _, truth = self.scopes.get(field.seed).render_stack(
                [0.0], (field.x_um, field.y_um), noise=False, shape_px=(window_px, window_px)
            )
            contrast.append(float(np.ptp(truth)))
        threshold = EMPTY_FIELD_CONTRAST * max(contrast)
        chosen = [f for f, c in zip(candidates, contrast) if c >= threshold][:count]
        skipped = sum(1 for c in contrast[: candidates.index(chosen[-1]) + 1] if c < threshold)
        log.info(kv("test_fields", chosen=len(chosen), skipped_empty=skipped))
        return chosen

    def _tilted(
        self,
        field: Field,
        name: str,
        distances_um: Sequence[float],
        truth: np.ndarray,
        shape: tuple[int, int],
        rng: np.random.Generator,
    ) -> list[Sample]:
        """Frames of the same field with the sample tilted along x (unseen in training). The tilted microscope has
        the same specimen seed, hence the same specimen; its in-focus ground truth is the flat one."""
        from acquire_refocus.sim.microscope import SimulatedMicroscope

        if self._tilted_scope is None or self._tilted_scope[0] != field.seed:
            drift = self.config.simulator.drift.model_copy(
                update={"model": "none", "tilt_x_um_per_mm": TILT_UM_PER_MM, "tilt_y_um_per_mm": 0.0}
            )
            simulator = self.config.simulator.model_copy(update={"seed": field.seed, "drift": drift})
            self._tilted_scope = (field.seed, SimulatedMicroscope(self.config.optics, simulator))
        tilted = self._tilted_scope[1]
        samples = []
        for d in sorted({s * d for d in distances_um for s in (-1.0, 1.0)}):
            xy = (field.x_um, field.y_um)
            stage_z = tilted.focus_z_um(xy) + d
            raw = tilted.render(stage_z, xy, rng=rng, shape_px=shape)
            samples.append(Sample(name, "tilt", tilted.defocus_um(stage_z, xy), raw, truth))
        return samples

    def true_psf(self, defocus_um: float) -> np.ndarray:
        return _crop_psf(self.bank.plane(int(self.bank.index(defocus_um))).astype(np.float64))


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
    in_focus = _crop_psf(bank.plane(int(bank.index(0.0))).astype(np.float64))
    offset = config.simulator.camera.offset_adu
    data_range = float(truth.max() - truth.min())
    chosen: dict[int, float] = {}
    for distance in sorted({round(abs(d)) for d in signed}):
        scores = {}
        for balance in WIENER_BALANCES:
            values = []
            for plane, d in zip(planes, signed):
                if round(abs(d)) != distance:
                    continue
                sample = Sample("tuning", "flat", d, plane, truth)
                psf = _crop_psf(bank.plane(int(bank.index(d))).astype(np.float64))
                image = _deconvolve(sample, psf, in_focus, offset, "wiener", balance)
                values.append(peak_signal_noise_ratio(truth, image, data_range=data_range))
            scores[balance] = float(np.mean(values))
        chosen[distance] = max(scores, key=scores.get)
    log.info(kv("wiener_balance_tuned", **{f"d{d}": b for d, b in chosen.items()}))
    return chosen


def baseline_methods(test_set: HeldOutSet, wiener_balance: dict[int, float]) -> dict[str, Method]:
    offset = test_set.config.simulator.camera.offset_adu
    in_focus = test_set.true_psf(0.0)

    def unprocessed(sample: Sample) -> tuple[np.ndarray, float, float]:
        return sample.raw.astype(np.float32), math.nan, math.nan

    def richardson_lucy(sample: Sample) -> tuple[np.ndarray, float, float]:
        psf = test_set.true_psf(sample.defocus_um)
        return _deconvolve(sample, psf, in_focus, offset, "richardson_lucy"), math.nan, math.nan

    def wiener(sample: Sample) -> tuple[np.ndarray, float, float]:
        distance = min(wiener_balance, key=lambda d: abs(d - abs(sample.defocus_um)))
        psf = test_set.true_psf(sample.defocus_um)
        return _deconvolve(sample, psf, in_focus, offset, "wiener", wiener_balance[distance]), math.nan, math.nan

    return {
        "input (unprocessed)": unprocessed,
        f"Richardson-Lucy, true PSF ({RL_ITERATIONS} it.)": richardson_lucy,
        "Wiener, true PSF, tuned balance": wiener,
    }


def network_method(
    weights: Path | None, pixel_size_um: float, num_threads: int | None = None, physics_fusion: bool = True
) -> tuple[Method, dict]:
    """The network as `Refocuser` runs it, told the test frames' pixel size (a model trained at another one
    resamples them, as it would on a scope); `physics_fusion` as engine.physics_fusion (model/fusion.py)."""
    from acquire_refocus.refocuser import Refocuser

    refocuser = Refocuser.load(
        weights,
        engine=EngineConfig(backend="torch", precision="fp32", num_threads=num_threads, physics_fusion=physics_fusion),
    )

    last: dict[int, tuple[float, float]] = {}  # id(sample) -> the factors of its result, until factors() asks

    def run(sample: Sample) -> tuple[np.ndarray, float, float]:
        result = refocuser(sample.raw, pixel_size_um=pixel_size_um)
        last[id(sample)] = (result.defocus_um, result.defocus_magnitude_um)
        return result.image, result.defocus_um, result.sigma_um

    def factors(sample: Sample) -> tuple[float, float]:
        """The focus head's two factors of the frame `run` just did: |d| and P(d > 0). The head makes
        defocus = |d| * tanh(logit / 2) = |d| * (2 P - 1), so P follows from the two outputs of the contract."""
        defocus_um, magnitude_um = last.pop(id(sample))
        p_positive = 0.5 * (1.0 + defocus_um / magnitude_um) if magnitude_um > 0 else 0.5
        return magnitude_um, p_positive

    info = {
        "sha256": refocuser.model_sha256,
        "metadata": refocuser.loaded.metadata,
        "architecture": refocuser.loaded.model_config.architecture,
        "parameters": sum(p.numel() for p in refocuser.loaded.network.parameters()),
        "factors": factors,
    }
    return run, info


def evaluate_methods(
    test_set: HeldOutSet,
    methods: dict[str, Method],
    factors: dict[str, Callable[[Sample], tuple[float, float]]] | None = None,
) -> list[Row]:
    rows = []
    for name, method in methods.items():
        started = time.monotonic()
        for sample in test_set.samples:
            if sample.setting == "tilt" and name.startswith("Wiener"):
                continue  # the tilt setting compares the input, RL and the networks only (time)
            t0 = time.perf_counter()
            image, estimate, sigma = method(sample)
            seconds = time.perf_counter() - t0
            data_range = float(sample.truth.max() - sample.truth.min())
            rows.append(
                Row(
                    method=name,
                    setting=sample.setting,
                    field=sample.field,
                    defocus_um=sample.defocus_um,
                    psnr_db=float(peak_signal_noise_ratio(sample.truth, image, data_range=data_range)),
                    ssim=float(structural_similarity(sample.truth, image, data_range=data_range)),
                    estimate_um=float(estimate),
                    sigma_um=float(sigma),
                    seconds=seconds,
                )
            )
            if factors and name in factors:
                rows[-1].magnitude_um, rows[-1].p_positive = factors[name](sample)
        log.info(kv("evaluated", method=name, frames=len(test_set.samples), seconds=round(time.monotonic() - started)))
    return rows


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "setting",
                "field",
                "defocus_um",
                "psnr_db",
                "ssim",
                "estimate_um",
                "sigma_um",
                "magnitude_um",
                "p_positive",
                "seconds",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.method,
                    r.setting,
                    r.field,
                    f"{r.defocus_um:.3f}",
                    f"{r.psnr_db:.3f}",
                    f"{r.ssim:.4f}",
                    # 6 significant digits: the sign of an estimate near 0 must survive (sign accuracy)
                    "" if math.isnan(r.estimate_um) else f"{r.estimate_um:.6g}",
                    "" if math.isnan(r.sigma_um) else f"{r.sigma_um:.3f}",
                    "" if math.isnan(r.magnitude_um) else f"{r.magnitude_um:.3f}",
                    "" if math.isnan(r.p_positive) else f"{r.p_positive:.6g}",
                    f"{r.seconds:.3f}",
                ]
            )


def _group(rows: Sequence[Row], key: Callable[[Row], object]) -> dict[object, list[Row]]:
    groups: dict[object, list[Row]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def metric_table(rows: Sequence[Row], metric: str, setting: str, sign: int | None, fmt: str) -> str:
    """Rows: methods; columns: |d| (descending), optionally only one sign of defocus."""
    chosen = [
        r
        for r in rows
        if r.setting == setting and (sign is None or r.defocus_um == 0 or math.copysign(1, r.defocus_um) == sign)
    ]
    distances = sorted({round(abs(r.defocus_um)) for r in chosen}, reverse=True)
    methods = list(dict.fromkeys(r.method for r in chosen))
    lines = []
    for method in methods:
        cells = [method]
        for d in distances:
            values = [getattr(r, metric) for r in chosen if r.method == method and round(abs(r.defocus_um)) == d]
            cells.append(format(float(np.mean(values)), fmt) if values else "-")
        lines.append(cells)
    return _markdown_table(["method \\ |defocus| (um)"] + [f"{d:g}" for d in distances], lines)


def focus_table(rows: Sequence[Row], setting: str) -> str:
    """Defocus MAE per |d| and sign accuracy (|d| >= SIGN_MIN_UM) for each method that estimates defocus."""
    chosen = [r for r in rows if r.setting == setting and not math.isnan(r.estimate_um)]
    distances = sorted({round(abs(r.defocus_um)) for r in chosen}, reverse=True)
    lines = []
    for method in dict.fromkeys(r.method for r in chosen):
        mine = [r for r in chosen if r.method == method]
        cells = [method]
        for d in distances:
            errors = [abs(r.estimate_um - r.defocus_um) for r in mine if round(abs(r.defocus_um)) == d]
            cells.append(f"{np.mean(errors):.2f}")
        signed = [r for r in mine if abs(r.defocus_um) >= SIGN_MIN_UM]
        correct = sum(1 for r in signed if np.sign(r.estimate_um) == np.sign(r.defocus_um))
        cells.append(f"{100.0 * correct / max(1, len(signed)):.1f}% ({correct}/{len(signed)})")
        lines.append(cells)
    header = (
        ["method \\ |defocus| (um)"] + [f"{d:g}" for d in distances] + [f"sign correct, abs(d) >= {SIGN_MIN_UM:g} um"]
    )
    return _markdown_table(header, lines)


def summary_numbers(rows: Sequence[Row], method: str, baseline: str, rl: str | None) -> dict[str, float | bool | None]:
    """The numbers the targets are judged on, for one network."""
    flat = [r for r in rows if r.setting == "flat"]

    def mean(metric: str, name: str, low: float, high: float) -> float:
        values = [getattr(r, metric) for r in flat if r.method == name and low <= abs(r.defocus_um) <= high]
        return float(np.mean(values)) if values else math.nan

    mine = [r for r in flat if r.method == method]
    gain_near = mean("psnr_db", method, 0, 10) - mean("psnr_db", baseline, 0, 10)
    gain_far = mean("psnr_db", method, 20, 35) - mean("psnr_db", baseline, 20, 35)
    by_distance = _group(flat, lambda r: (r.method, round(abs(r.defocus_um))))
    distances = sorted({round(abs(r.defocus_um)) for r in flat})
    beats_rl = (
        None
        if rl is None
        else all(
            np.mean([r.psnr_db for r in by_distance[(method, d)]]) > np.mean([r.psnr_db for r in by_distance[(rl, d)]])
            for d in distances
        )
    )
    mae_near = float(np.mean([abs(r.estimate_um - r.defocus_um) for r in mine if abs(r.defocus_um) <= 10]))
    mae_all = float(np.mean([abs(r.estimate_um - r.defocus_um) for r in mine if abs(r.defocus_um) <= 35]))
    worst_far = max(
        float(np.mean([abs(r.estimate_um - r.defocus_um) for r in mine if round(abs(r.defocus_um)) == d]))
        for d in distances
    )
    signed = [r for r in mine if abs(r.defocus_um) >= SIGN_MIN_UM]
    sign = sum(1 for r in signed if np.sign(r.estimate_um) == np.sign(r.defocus_um)) / max(1, len(signed))
    return {
        "psnr_gain_near_db": gain_near,
        "psnr_gain_far_db": gain_far,
        "beats_rl_everywhere": beats_rl,
        "mae_near_um": mae_near,
        "mae_all_um": mae_all,
        "mae_worst_distance_um": worst_far,
        "sign_accuracy": sign,
    }


def magnitude_table(rows: Sequence[Row], setting: str) -> str:
    chosen = [r for r in rows if r.setting == setting and not math.isnan(r.magnitude_um)]
    distances = sorted({round(abs(r.defocus_um)) for r in chosen}, reverse=True)
    lines = []
    for method in dict.fromkeys(r.method for r in chosen):
        mine = [r for r in chosen if r.method == method]
        cells = [method]
        for d in distances:
            cells.append(
                f"{np.mean([abs(r.magnitude_um - abs(r.defocus_um)) for r in mine if round(abs(r.defocus_um)) == d]):.2f}"
            )
        signed = [r for r in mine if abs(r.defocus_um) >= SIGN_MIN_UM]
        correct = sum(1 for r in signed if (r.p_positive > 0.5) == (r.defocus_um > 0))
        cells.append(f"{100.0 * correct / max(1, len(signed)):.1f}%")
        lines.append(cells)
    header = ["|d| error of the magnitude factor (um)"] + [f"{d:g}" for d in distances] + ["P(d>0) on the right side"]
    return _markdown_table(header, lines)


def _stage_note(training: dict) -> str:
    """Where a run that started from other weights started (training.initial_weights), in words, back through
    every earlier stage the files record."""
    start = training.get("initial_weights")
    if not start:
        return ""
    only = {"focus_head": " (focus head only)", "decoder": " (image decoder only)"}.get(training.get("train_only"), "")
    before = start.get("training") or {}
    return (
        f"{only}, starting from weights sha256 {start['sha256'][:16]}... trained {before.get('steps', '?')} "
        f"steps (batch {before.get('batch_size', '?')}, {before.get('patch_size_px', '?')} px patches) in "
        f"{float(before.get('wall_time_s', 0)) / 60:.1f} min{_stage_note(before)}"
    )


def calibration_line(rows: Sequence[Row], method: str) -> str:
    mine = [r for r in rows if r.method == method and r.setting == "flat"]
    within1 = np.mean([abs(r.estimate_um - r.defocus_um) <= r.sigma_um for r in mine])
    within2 = np.mean([abs(r.estimate_um - r.defocus_um) <= 2 * r.sigma_um for r in mine])
    median_sigma = float(np.median([r.sigma_um for r in mine]))
    return (
        f"{method}: {100 * within1:.0f}% of errors within 1 sigma, {100 * within2:.0f}% within 2 sigma, "
        f"median sigma {median_sigma:.2f} um"
    )


def plot_scatter(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimating = [
        m
        for m in dict.fromkeys(r.method for r in rows)
        if any(not math.isnan(r.estimate_um) for r in rows if r.method == m)
    ]
    fig, axes = plt.subplots(1, max(1, len(estimating)), figsize=(5 * max(1, len(estimating)), 5), squeeze=False)
    for ax, method in zip(axes[0], estimating):
        for setting, marker in (("flat", "o"), ("tilt", "x")):
            mine = [r for r in rows if r.method == method and r.setting == setting]
            if mine:
                ax.scatter(
                    [r.defocus_um for r in mine],
                    [r.estimate_um for r in mine],
                    s=14,
                    marker=marker,
                    alpha=0.7,
                    label=f"{setting} sample",
                )
        limit = max(abs(r.defocus_um) for r in rows) + 3
        ax.plot([-limit, limit], [-limit, limit], "k--", lw=0.8)
        ax.set(
            xlim=(-limit, limit),
            ylim=(-limit, limit),
            xlabel="true defocus (um)",
            ylabel="estimated defocus (um)",
            title=method,
        )
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(test_set: HeldOutSet, methods: dict[str, Method], distances_um: Sequence[float], path: Path) -> None:
    """One field at a few defocus distances: each method's output beside the input and the ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field = test_set.samples[0].field
    chosen = [
        s
        for d in distances_um
        for s in test_set.samples
        if s.field == field and s.setting == "flat" and abs(s.defocus_um - d) < 1e-6
    ]
    names = list(methods)
    fig, axes = plt.subplots(
        len(chosen), len(names) + 1, figsize=(2.6 * (len(names) + 1), 2.7 * len(chosen)), squeeze=False
    )
    for i, sample in enumerate(chosen):
        low, high = np.percentile(sample.truth, [0.5, 99.8])
        for j, name in enumerate(names):
            image, _, _ = methods[name](sample)
            ax = axes[i, j]
            ax.imshow(image, cmap="gray", vmin=low, vmax=high)
            data_range = float(sample.truth.max() - sample.truth.min())
            psnr = peak_signal_noise_ratio(sample.truth, image, data_range=data_range)
            label = textwrap.shorten(name, 34, placeholder="...")
            ax.set_title(f"{label}\nd={sample.defocus_um:+g} um, {psnr:.1f} dB", fontsize=7)
            ax.axis("off")
        axes[i, -1].imshow(sample.truth, cmap="gray", vmin=low, vmax=high)
        axes[i, -1].set_title("ground truth (in focus)", fontsize=7)
        axes[i, -1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _status(value: bool) -> str:
    return "met" if value else "MISSED"


def write_report(
    out_dir: Path, rows: Sequence[Row], networks: dict[str, dict], test_set: HeldOutSet, wall_s: float
) -> Path:
    """report.md with the tables, the targets and how the numbers were made."""
    baseline = "input (unprocessed)"
    rl = next((name for name in dict.fromkeys(r.method for r in rows) if name.startswith("Richardson")), None)
    config = test_set.config
    flat = [r for r in rows if r.setting == "flat"]
    tilt = [r for r in rows if r.setting == "tilt"]
    lines = [
        "# Refocus network evaluation",
        "",
        f"Generated by `acquire-refocus evaluate` in {wall_s / 60:.1f} min. Raw numbers: `metrics.csv` "
        "(one row per method and frame).",
        "",
        "## Test data",
        "",
        f"- Held-out simulated specimens, seeds {sorted({f.seed for f in test_set.fields})} "
        f"(training used seeds from 1000, validation from 2000): {len(test_set.fields)} fields of view, "
        f"{test_set.samples[0].raw.shape[0]}x{test_set.samples[0].raw.shape[1]} px at "
        f"{config.optics.pixel_size_um:.3f} um/px, {config.optics.magnification:g}x/{config.optics.numerical_aperture} "
        f"NA, {config.optics.emission_wavelength_nm:g} nm, camera noise on.",
        f"- Flat sample at signed defocus {sorted({r.defocus_um for r in flat})} um "
        f"({len({(r.field, r.defocus_um) for r in flat})} frames).",
        f"- Unseen setting: the same fields with the sample tilted by {TILT_UM_PER_MM:g} um/mm along x (defocus "
        f"varies by {TILT_UM_PER_MM * test_set.samples[0].raw.shape[1] * config.optics.pixel_size_um / 1000:.1f} um "
        "across the frame); the true defocus is that of the frame centre.",
        "- PSNR and SSIM from skimage.metrics against the noiseless in-focus ground truth, in ADU, with "
        "data_range = max(truth) - min(truth) of each frame. Means over fields; |d| columns average both signs.",
        f"- Richardson-Lucy ({RL_ITERATIONS} iterations) and Wiener deconvolution (skimage.restoration) get the "
        "true PSF at the true defocus from the simulator's PSF bank (camera offset removed, reflect-padded by the "
        "PSF radius); the Wiener balance is tuned per |defocus| on a validation specimen (seed 2000), never on the "
        "test set. Deconvolution estimates the object, the ground truth is the in-focus image, so both are "
        "re-blurred with the in-focus PSF before scoring. Networks run through `Refocuser` on the PyTorch engine "
        "(FP32), whole frames; they are never told the defocus.",
        "",
        "## Networks",
        "",
    ]
    for name, info in networks.items():
        training = info["metadata"].get("training", {})
        lines.append(
            f"- **{name}**: architecture `{info['architecture']}`, {info['parameters']:,} parameters, "
            f"sha256 {info['sha256'][:16]}..., trained {training.get('steps', '?')} steps "
            f"(batch {training.get('batch_size', '?')}, {training.get('patch_size_px', '?')} px patches) in "
            f"{float(training.get('wall_time_s', 0)) / 60:.1f} min on {training.get('device', '?')} "
            f"({training.get('threads', '?')} threads){_stage_note(training)}."
        )
    lines += [
        "",
        "## PSNR (dB) per |defocus|, flat sample (layout of the head-to-tail paper's Table 2)",
        "",
        metric_table(rows, "psnr_db", "flat", None, ".2f"),
        "",
        "For reference, the paper reports on real BBBC006 data (other images, noise and intensity scaling: not comparable "
        "in absolute terms, only the gains are): "
        "input 32.05/32.42/32.92/33.73/35.40 dB and network 34.55/35.69/36.35/37.99/40.86 dB at 34/28/22/16/10 um.",
        "",
        "## SSIM per |defocus|, flat sample",
        "",
        metric_table(rows, "ssim", "flat", None, ".3f"),
        "",
        "## PSNR (dB) by sign of defocus",
        "",
        "Positive defocus (stage too high, focal plane too deep):",
        "",
        metric_table(rows, "psnr_db", "flat", 1, ".2f"),
        "",
        "Negative defocus (focal plane too shallow):",
        "",
        metric_table(rows, "psnr_db", "flat", -1, ".2f"),
        "",
        "## Defocus estimate: mean absolute error (um) per |defocus| and sign accuracy, flat sample",
        "",
        focus_table(rows, "flat"),
        "",
        "![estimated vs true defocus](defocus_scatter.png)",
        "",
        "The focus head factors the estimate as |d| x sign (see network.FocusHead). Its unsigned part alone, "
        "|estimate of |d|| - |d|| (um), and the share of frames with |d| >= 3 um whose P(d > 0) is on the right side "
        "of 0.5:",
        "",
        magnitude_table(rows, "flat"),
        "",
        "Uncertainty calibration (a Gaussian sigma would cover 68% of errors within 1 sigma, 95% within 2): "
        + "; ".join(calibration_line(rows, name) for name in networks)
        + ".",
        "",
    ]
    if tilt:
        lines += [
            f"## Unseen setting: tilted sample ({TILT_UM_PER_MM:g} um/mm)",
            "",
            "PSNR (dB):",
            "",
            metric_table(rows, "psnr_db", "tilt", None, ".2f"),
            "",
            "Defocus MAE (um) against the frame-centre defocus:",
            "",
            focus_table(rows, "tilt"),
            "",
        ]
    lines += ["## Targets", ""]
    for name in networks:
        numbers = summary_numbers(rows, name, baseline, rl)
        lines += [
            f"**{name}**:",
            "",
            f"- PSNR gain over the input for |d| <= 10 um: {numbers['psnr_gain_near_db']:+.2f} dB (target >= +5 dB): "
            f"{_status(numbers['psnr_gain_near_db'] >= 5)}",
            f"- PSNR gain over the input for 20 <= |d| <= 35 um: {numbers['psnr_gain_far_db']:+.2f} dB "
            f"(target >= +3 dB): {_status(numbers['psnr_gain_far_db'] >= 3)}",
            "- better PSNR than Richardson-Lucy with the true PSF at every distance: "
            + (
                "not measured (--no-baselines)"
                if numbers["beats_rl_everywhere"] is None
                else _status(bool(numbers["beats_rl_everywhere"]))
            ),
            f"- defocus MAE for |d| <= 10 um: {numbers['mae_near_um']:.2f} um (target <= 0.5 um): "
            f"{_status(numbers['mae_near_um'] <= 0.5)}",
            f"- defocus MAE at the worst distance up to 35 um: {numbers['mae_worst_distance_um']:.2f} um "
            f"(target <= 1.5 um; mean over all distances {numbers['mae_all_um']:.2f} um): "
            f"{_status(numbers['mae_worst_distance_um'] <= 1.5)}",
            f"- sign correct for |d| >= {SIGN_MIN_UM:g} um: {100 * numbers['sign_accuracy']:.1f}% (target >= 98%): "
            f"{_status(numbers['sign_accuracy'] >= 0.98)}",
            "",
        ]
    lines += ["## Examples", "", "![example panels](examples.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_evaluation(
    config: AppConfig,
    weights: Sequence[tuple[str, Path | None]],
    out_dir: Path,
    fields: int = 6,
    window_px: int = 256,
    distances_um: Sequence[float] = DEFAULT_DISTANCES_UM,
    tilt_distances_um: Sequence[float] = TILT_DISTANCES_UM,
    baselines: bool = True,
) -> Path:
    """Build the test set, run every method, write metrics.csv, the PNGs and report.md; returns the report."""
    started = time.monotonic()
    output_folder(out_dir, "--out")
    test_set = HeldOutSet(config, fields, window_px, distances_um, tilt_distances_um, seed=config.training.seed)
    log.info(
        kv(
            "test_set_ready",
            frames=len(test_set.samples),
            fields=fields,
            window_px=window_px,
            seconds=round(time.monotonic() - started),
        )
    )
    if baselines:
        methods = baseline_methods(test_set, tune_wiener_balance(config, distances_um, window_px))
    else:
        methods = {"input (unprocessed)": baseline_methods(test_set, {})["input (unprocessed)"]}
    networks: dict[str, dict] = {}
    for index, (label, path) in enumerate(weights):
        # the first (candidate) model as the daemon runs it, and alone; the others as their network alone
        method, info = network_method(
            path,
            config.optics.pixel_size_um,
            config.engine.num_threads,
            physics_fusion=config.engine.physics_fusion and index == 0,
        )
        methods[label] = method
        networks[label] = info
        if index == 0 and config.engine.physics_fusion:
            method, info = network_method(
                path, config.optics.pixel_size_um, config.engine.num_threads, physics_fusion=False
            )
            methods[f"{label}, network alone"] = method
            networks[f"{label}, network alone"] = info
    rows = evaluate_methods(test_set, methods, {label: info["factors"] for label, info in networks.items()})
    write_csv(rows, out_dir / "metrics.csv")
    plot_scatter(rows, out_dir / "defocus_scatter.png")
    plot_examples(test_set, methods, (-28.0, 10.0, 2.0), out_dir / "examples.png")
    return write_report(out_dir, rows, networks, test_set, time.monotonic() - started)
