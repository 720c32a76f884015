"""The evaluation's report: markdown tables per |defocus| (PSNR, SSIM, defocus error, sign), the numbers the
targets are judged on, the uncertainty calibration, and the two figures (estimated against true defocus, example
panels), in report.md beside metrics.csv."""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from acquire_refocus.model.baselines import RL_ITERATIONS, Method
from acquire_refocus.model.held_out import TILT_UM_PER_MM, HeldOutSet
from acquire_refocus.model.scoring import Row

if TYPE_CHECKING:
    from acquire_refocus.model.physics_path import PhysicsPathCalibration

SIGN_MIN_UM = 3.0


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


@dataclass(frozen=True)
class TargetNumbers:
    """The numbers the targets are judged on, for one network (flat sample)."""

    psnr_gain_near_db: float  # over the input, |d| <= 10 um
    psnr_gain_far_db: float  # over the input, 20 <= |d| <= 35 um
    beats_rl_everywhere: bool | None  # None: Richardson-Lucy not run
    mae_near_um: float
    mae_all_um: float
    mae_worst_distance_um: float
    sign_accuracy: float  # share of |d| >= SIGN_MIN_UM frames


def summary_numbers(rows: Sequence[Row], method: str, baseline: str, rl: str | None) -> TargetNumbers:
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
    return TargetNumbers(
        psnr_gain_near_db=gain_near,
        psnr_gain_far_db=gain_far,
        beats_rl_everywhere=beats_rl,
        mae_near_um=mae_near,
        mae_all_um=mae_all,
        mae_worst_distance_um=worst_far,
        sign_accuracy=sign,
    )


def magnitude_table(rows: Sequence[Row], setting: str) -> str:
    chosen = [r for r in rows if r.setting == setting and not math.isnan(r.magnitude_um)]
    distances = sorted({round(abs(r.defocus_um)) for r in chosen}, reverse=True)
    lines = []
    for method in dict.fromkeys(r.method for r in chosen):
        mine = [r for r in chosen if r.method == method]
        cells = [method]
        for d in distances:
            errors = [abs(r.magnitude_um - abs(r.defocus_um)) for r in mine if round(abs(r.defocus_um)) == d]
            cells.append(f"{np.mean(errors):.2f}")
        signed = [r for r in mine if abs(r.defocus_um) >= SIGN_MIN_UM]
        correct = sum(1 for r in signed if (r.p_positive > 0.5) == (r.defocus_um > 0))
        cells.append(f"{100.0 * correct / max(1, len(signed)):.1f}%")
        lines.append(cells)
    header = ["|d| error of the magnitude factor (um)"] + [f"{d:g}" for d in distances] + ["P(d>0) on the right side"]
    return _markdown_table(header, lines)


def stage_note(training: dict[str, Any]) -> str:
    """Where a run that started from other weights started (training.initial_weights), in words, back through
    every earlier stage the files record."""
    start = training.get("initial_weights")
    if not start:
        return ""
    only = {"focus_head": " (focus head only)", "decoder": " (image decoder only)"}.get(
        str(training.get("train_only")), ""
    )
    before = start.get("training") or {}
    return (
        f"{only}, starting from weights sha256 {start['sha256'][:16]}... trained {before.get('steps', '?')} "
        f"steps (batch {before.get('batch_size', '?')}, {before.get('patch_size_px', '?')} px patches) in "
        f"{float(before.get('wall_time_s', 0)) / 60:.1f} min{stage_note(before)}"
    )


def physics_path_note(training: dict[str, Any]) -> str:
    """The physics-path calibration the weights carry (model/physics_path.py), in words; "" without one."""
    from acquire_refocus.model.physics_path import PhysicsPathCalibration

    recorded = training.get("physics_path")
    if not recorded:
        return ""
    try:
        calibration = PhysicsPathCalibration.from_metadata(recorded)
    except ValueError as exc:
        return f" Physics path not used: {exc}."
    edges = ["0", *(f"{edge:g}" for edge in calibration.bin_edges_um)]
    mixed = [
        f"{share:g} at {edges[i]}-{edges[i + 1]} um" if i + 1 < len(edges) else f"{share:g} beyond {edges[i]} um"
        for i, share in enumerate(calibration.shares)
        if share > 0
    ]
    margins = f"; fusion margin {margin_spans(calibration)}" if calibration.margins_um else ""
    return (
        " Physics path (with the fusion): Wiener share per estimated |d| "
        + (", ".join(mixed) if mixed else "0 everywhere")
        + f"{margins}, calibrated on {calibration.source}."
    )


def margin_spans(calibration: PhysicsPathCalibration) -> str:
    """The per-bin fusion margins in words, neighbouring bins with one margin as one span: "3.26 um up to 10.5 um,
    0 at 10.5-15.75 um, ...", the last span open."""
    edges = (0.0, *calibration.bin_edges_um)
    spans: list[tuple[int, int, float]] = []  # (first bin, last bin, margin)
    for index, margin in enumerate(calibration.margins_um):
        if spans and spans[-1][2] == margin:
            spans[-1] = (spans[-1][0], index, margin)
        else:
            spans.append((index, index, margin))
    words = []
    for first, last, margin in spans:
        if last == len(edges) - 1:
            where = f"beyond {edges[first]:g} um" if first > 0 else "at every |d|"
        else:
            where = f"up to {edges[last + 1]:g} um" if first == 0 else f"at {edges[first]:g}-{edges[last + 1]:g} um"
        words.append(f"{margin:g} um {where}")
    return ", ".join(words)


def network_note(info: dict[str, Any], training: dict[str, Any]) -> str:
    """How a scored network's image was made (scoring.network_method records the switches): without the fusion,
    through it with the one margin and no physics path (switched off, or no calibration in the weights), or the
    calibration's note."""
    if not info.get("fusion", True):
        return " Run without the fusion: the network's image as it is."
    if not info.get("physics_path", True):
        return " Run through the fusion with the model's one margin, without the physics path."
    return physics_path_note(training)


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
    for ax, method in zip(axes[0], estimating, strict=False):  # one empty panel without estimates
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
    out_dir: Path, rows: Sequence[Row], networks: dict[str, dict[str, Any]], test_set: HeldOutSet, wall_s: float
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
            f"({training.get('threads', '?')} threads){stage_note(training)}.{network_note(info, training)}"
        )
    lines += [
        "",
        "## PSNR (dB) per |defocus|, flat sample (layout of the head-to-tail paper's Table 2)",
        "",
        metric_table(rows, "psnr_db", "flat", None, ".2f"),
        "",
        "For reference, the paper reports on real BBBC006 data (other images, noise and intensity scaling: not "
        "comparable in absolute terms, only the gains are): "
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
            f"- PSNR gain over the input for |d| <= 10 um: {numbers.psnr_gain_near_db:+.2f} dB (target >= +5 dB): "
            f"{_status(numbers.psnr_gain_near_db >= 5)}",
            f"- PSNR gain over the input for 20 <= |d| <= 35 um: {numbers.psnr_gain_far_db:+.2f} dB "
            f"(target >= +3 dB): {_status(numbers.psnr_gain_far_db >= 3)}",
            "- better PSNR than Richardson-Lucy with the true PSF at every distance: "
            + (
                "not measured (--no-baselines)"
                if numbers.beats_rl_everywhere is None
                else _status(bool(numbers.beats_rl_everywhere))
            ),
            f"- defocus MAE for |d| <= 10 um: {numbers.mae_near_um:.2f} um (target <= 0.5 um): "
            f"{_status(numbers.mae_near_um <= 0.5)}",
            f"- defocus MAE at the worst distance up to 35 um: {numbers.mae_worst_distance_um:.2f} um "
            f"(target <= 1.5 um; mean over all distances {numbers.mae_all_um:.2f} um): "
            f"{_status(numbers.mae_worst_distance_um <= 1.5)}",
            f"- sign correct for |d| >= {SIGN_MIN_UM:g} um: {100 * numbers.sign_accuracy:.1f}% (target >= 98%): "
            f"{_status(numbers.sign_accuracy >= 0.98)}",
            "",
        ]
    lines += ["## Examples", "", "![example panels](examples.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
