"""Evaluate refocus networks against the raw input and deconvolution baselines on held-out simulated specimens.

One job per module: the test frames (model/held_out.py: held-out specimens, flat and tilted), the classical
baselines (model/baselines.py: Richardson-Lucy and Wiener deconvolution with the true PSF), running and scoring
every method (model/scoring.py: PSNR, SSIM and the defocus estimate per frame, metrics.csv) and the report
(model/report.py: tables, targets, figures). This module runs them in order (`run_evaluation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from acquire_refocus.config import AppConfig
from acquire_refocus.logs import kv
from acquire_refocus.model.baselines import baseline_methods, tune_wiener_balance
from acquire_refocus.model.held_out import HeldOutSet, Sample
from acquire_refocus.model.report import plot_examples, plot_scatter, write_report
from acquire_refocus.model.scoring import evaluate_methods, network_method, network_methods, write_csv
from acquire_refocus.outputs import output_folder

__all__ = [
    "DEFAULT_DISTANCES_UM",
    "TILT_DISTANCES_UM",
    "HeldOutSet",
    "Sample",
    "example_distances_um",
    "network_method",
    "run_evaluation",
    "tune_wiener_balance",
]

log = logging.getLogger(__name__)

# The head-to-tail paper's Table 2 columns (34/28/22/16/10 um) and closer distances, both signs.
DEFAULT_DISTANCES_UM = (34.0, 28.0, 22.0, 16.0, 10.0, 5.0, 2.0, 1.0, 0.0)
TILT_DISTANCES_UM = (22.0, 10.0, 2.0)


def example_distances_um(distances_um: Sequence[float]) -> tuple[float, ...]:
    """Three signed distances for the examples figure: far (below focus), middle and near (above): -28, 10 and 2 um
    of the default distances, and the same places among scaled ones."""
    away = sorted({abs(d) for d in distances_um if d != 0}, reverse=True)
    if not away:
        return (0.0,)
    picks = (-away[min(1, len(away) - 1)], away[len(away) // 2], away[max(0, len(away) - 2)])
    return tuple(dict.fromkeys(picks))


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
    runs, networks = network_methods(config, weights)
    methods.update(runs)
    rows = evaluate_methods(test_set, methods, {label: info["factors"] for label, info in networks.items()})
    write_csv(rows, out_dir / "metrics.csv")
    plot_scatter(rows, out_dir / "defocus_scatter.png")
    plot_examples(test_set, methods, example_distances_um(distances_um), out_dir / "examples.png")
    return write_report(out_dir, rows, networks, test_set, time.monotonic() - started)
