"""`acquire-refocus evaluate`: compare refocus networks with the raw input and deconvolution baselines."""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from acquire_refocus.commands.calibrate_focus import add_stack_arguments
from acquire_refocus.errors import UserError
from acquire_refocus.model.verdict import (
    HARMS_BELOW_GAIN_DB,
    HELPS_MIN_GAIN_DB,
    RangeVerdict,
    range_verdicts,
    verdict_lines,
)

if TYPE_CHECKING:
    from acquire_refocus.config import AppConfig, EngineConfig
    from acquire_refocus.model.stack_eval import StackModel


def _weights_argument(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep:
        return Path(text).stem, Path(text)
    if not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH or PATH, got {text!r}")
    return label, Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Evaluate refocus networks on held-out simulated specimens (seeds never used in training) at fixed defocus "
        "distances, and on a tilted sample (a setting never seen in training). Compares them with the unprocessed "
        "input, Richardson-Lucy and Wiener deconvolution given the true PSF. Writes DIR/report.md (PSNR/SSIM per "
        "defocus distance, defocus MAE, sign accuracy, targets), DIR/metrics.csv, DIR/defocus_scatter.png and "
        "DIR/examples.png."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML config (optics and simulator sections); default: built-in simulated microscope",
    )
    parser.add_argument(
        "--weights",
        type=_weights_argument,
        action="append",
        default=None,
        metavar="[LABEL=]W",
        help="a weights file to evaluate, optionally labelled; repeat for several (default: the shipped model)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder (created if needed)")
    parser.add_argument("--fields", type=int, default=6, metavar="N", help="test fields of view (default 6)")
    parser.add_argument("--size-px", type=int, default=256, metavar="PX", help="test frame size (default 256)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the deconvolution baselines (the slow part)")
    parser.add_argument("--no-tilt", action="store_true", help="skip the tilted-sample setting")
    parser.add_argument(
        "--suite",
        choices=("heldout", "ood"),
        default=None,
        help="heldout (default): the simulator's held-out specimens with deconvolution baselines; "
        "ood: the out-of-distribution sets (a real nuclei image, a second PSF model, 20 to 5,000 "
        "photons, a held-out specimen family) with a physics-informed method (model/ood.py)",
    )
    parser.add_argument(
        "--set",
        dest="only_sets",
        action="append",
        default=None,
        metavar="NAME",
        help="with --suite ood: score only the sets whose names start with NAME (e.g. beads, 'real nuclei', "
        "'nuclei, peak'); repeat for several. The frames are the whole suite's; no --record with a part of it",
    )
    stack = parser.add_argument_group(
        "your own z-stack (instead of a simulated suite)",
        "Score the model on a z-stack taken with your microscope: every plane, raw and refocused, against the "
        "plane you call in focus (PSNR gain per distance; that plane is noisy, which pulls the gains towards 0 "
        "dB but keeps their sign), and the error of the unsigned distance estimate. Prints one table and writes "
        "DIR/report.md, DIR/metrics.csv and a plot per model.",
    )
    stack.add_argument(
        "--stack",
        type=Path,
        default=None,
        metavar="STACK",
        help="a multi-page TIFF (planes, height, width; one channel, planes in stage-Z order) or a "
        "folder of plane folders, read as calibrate-focus reads it",
    )
    add_stack_arguments(stack, "the reference")
    parser.add_argument(
        "--record",
        action="store_true",
        help="record the verdict per distance beside each weights file (WEIGHTS.evaluation.json, "
        "with its sha256; the shipped model's in the user's data folder). serve and correct "
        "withhold refocused frames from a model recorded to harm at some distance unless "
        "pipeline.allow_harmful_model (serve) or --allow-harmful-model (correct) is given",
    )


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.config import load_config
    from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS
    from acquire_refocus.model.evaluate import DEFAULT_DISTANCES_UM, TILT_DISTANCES_UM, run_evaluation
    from acquire_refocus.model.ood import distance_scale

    if args.fields < 1:
        raise UserError(f"--fields must be at least 1, got {args.fields}")
    if args.size_px < 64:
        raise UserError(f"--size-px must be at least 64, got {args.size_px}")
    config = load_config(args.config)
    weights = args.weights or [("U-Net (shipped default)", None)]
    labels = [label for label, _ in weights]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--weights: the label(s) {', '.join(repeated)} name more than one model; give each its own")
    for label, path in weights:
        if path is not None and not path.is_file():
            raise UserError(f"--weights {label}: {path} not found")
    if args.only_sets and args.suite != "ood":
        raise UserError("--set picks sets of the out-of-distribution suite: give it with --suite ood")
    if args.only_sets and args.record:
        raise UserError("--record needs the whole suite: a verdict from some of its sets could hide a harm in others")
    if args.stack is not None:
        if args.suite is not None:
            raise UserError(f"--stack evaluates your z-stack; --suite {args.suite} evaluates simulated data: give one")
        judged, report = _stack_suite(args, config, weights)
    elif args.suite == "ood":
        from acquire_refocus.model.ood import run_ood_evaluation

        report = run_ood_evaluation(
            config,
            weights,
            args.out,
            fields=args.fields,
            window_px=args.size_px,
            physics=not args.no_baselines,
            only=args.only_sets or (),
        )
        judged = _judge_csv(args.out / "metrics.csv", "ood", [label for label, _ in weights], _optics_text(config))
    else:
        # distances scale with the training range, as the ood suite's: a 60x model is tested over its own +-6 um
        scale = distance_scale(config)
        report = run_evaluation(
            config,
            weights,
            args.out,
            fields=args.fields,
            window_px=args.size_px,
            distances_um=tuple(round(d * scale, 2) for d in DEFAULT_DISTANCES_UM),
            tilt_distances_um=() if args.no_tilt else tuple(round(d * scale, 2) for d in TILT_DISTANCES_UM),
            baselines=not args.no_baselines,
        )
        judged = _judge_csv(args.out / "metrics.csv", "heldout", [label for label, _ in weights], _optics_text(config))
    if args.stack is None:
        _append_verdicts(report, judged)
    _print_verdicts(judged)
    print(f"report: {report}")
    if args.record:
        for label, path in weights:
            _record(path or DEFAULT_WEIGHTS, judged[label])
    return 0


# label -> evaluation name -> (source, ranges)
Judged = dict[str, dict[str, tuple[str, list[RangeVerdict]]]]


def _optics_text(config: AppConfig) -> str:
    optics = config.optics
    return (
        f"{optics.magnification:g}x/{optics.numerical_aperture:g} NA, {optics.emission_wavelength_nm:g} nm, "
        f"{optics.pixel_size_um:.3f} um pixels"
    )


def _judge_csv(metrics: Path, suite: str, labels: Sequence[str], optics: str) -> Judged:
    """Verdicts per network from a simulated suite's metrics.csv: heldout, the flat sample's PSNR minus the
    input's per |d|; ood, each set's mean psnr_gain_db per |d|."""
    with metrics.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    judged: Judged = {}
    for label in labels:
        if suite == "heldout":
            flat = [r for r in rows if r["setting"] == "flat"]
            psnr: dict[tuple[str, float], list[float]] = defaultdict(list)
            for r in flat:
                psnr[(r["method"], abs(float(r["defocus_um"])))].append(float(r["psnr_db"]))
            gains = {
                d: float(np.mean(psnr[(label, d)]) - np.mean(psnr[("input (unprocessed)", d)]))
                for method, d in psnr
                if method == label
            }
            judged[label] = {"heldout": (f"simulated held-out specimens, {optics}", range_verdicts(gains))}
        else:
            by_set: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in rows:
                if r["method"] == label:
                    by_set[r["set"]][abs(float(r["defocus_um"]))].append(float(r["psnr_gain_db"]))
            judged[label] = {
                f"ood: {name}": (
                    f"out-of-distribution set '{name}', {optics}",
                    range_verdicts({d: float(np.mean(g)) for d, g in cells.items()}),
                )
                for name, cells in by_set.items()
            }
    return judged


def _verdict_text(judged: Judged) -> list[str]:
    lines = []
    for label, evaluations in judged.items():
        for source, ranges in evaluations.values():
            lines += verdict_lines(f"{label}, {source}", ranges)
    return lines


def _append_verdicts(report: Path, judged: Judged) -> None:
    thresholds = (
        f"Per |d|: helps (PSNR gain >= +{HELPS_MIN_GAIN_DB:g} dB over the raw frame), neutral "
        f"({HARMS_BELOW_GAIN_DB:g} to +{HELPS_MIN_GAIN_DB:g} dB), harms (< {HARMS_BELOW_GAIN_DB:g} dB)."
    )
    with report.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(["", "## Verdict", "", thresholds, "", "```", *_verdict_text(judged), "```", ""]))


def _print_verdicts(judged: Judged) -> None:
    print(
        "\n".join(
            ["verdict per |defocus| (helps >= +1 dB, neutral -0.3 to +1 dB, harms < -0.3 dB):", *_verdict_text(judged)]
        )
    )


def _record(weights: Path, evaluations: dict[str, tuple[str, list[RangeVerdict]]]) -> None:
    from acquire_refocus.model.verdict import file_sha256, record_evaluation

    sha256 = file_sha256(weights)
    paths = {record_evaluation(weights, sha256, name, source, ranges) for name, (source, ranges) in evaluations.items()}
    print("\n".join(f"verdict recorded: {path}" for path in sorted(paths)))


def _stack_suite(
    args: argparse.Namespace, config: AppConfig, weights: Sequence[tuple[str, Path | None]]
) -> tuple[Judged, Path]:
    """Every network on the user's z-stack: a table each on the terminal, report.md, metrics.csv, a plot each."""
    from acquire_refocus.commands.calibrate_focus import read_stacks
    from acquire_refocus.model import stack_eval
    from acquire_refocus.outputs import output_folder

    for option in ("z_step_um", "pixel_size_um"):
        value = getattr(args, option)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{option.replace('_', '-')} must be a positive number, got {value}")
    fields, z_um, dataset_pixel_um, labelled = read_stacks(args)
    if not labelled:
        raise UserError(f"{args.stack}: say which plane is in focus with --in-focus-index (the reference)")
    pixel_size_um = args.pixel_size_um or dataset_pixel_um or config.optics.pixel_size_um
    output_folder(args.out, "--out")
    steps = np.diff(np.sort(z_um))
    source = (
        f"z-stack {args.stack} ({len(fields)} field(s), {len(z_um)} planes {float(np.median(steps)):g} um "
        f"apart, reference: the in-focus plane, pixel {pixel_size_um:.4g} um)"
    )
    judged: Judged = {}
    sections: list[str] = []
    all_rows: list[tuple[str, stack_eval.StackRow]] = []
    for label, path in weights:
        model = _refocuser_model(path, pixel_size_um, config.engine)
        rows = stack_eval.evaluate_stack(fields, z_um, model)
        summaries = stack_eval.per_distance(rows)
        ranges = stack_eval.stack_ranges(summaries)
        plot_name = f"stack_{_slug(label)}.png"
        stack_eval.plot(rows, f"{label} on {args.stack.name}", args.out / plot_name)
        table = stack_eval.table_lines(summaries)
        print(f"{label} on {source}:")
        print("\n".join(table))
        sections += stack_eval.report_section(label, table, ranges, plot_name)
        judged[label] = {f"stack: {args.stack.resolve()}": (source, ranges)}
        all_rows += [(label, row) for row in rows]
    stack_eval.write_csv(all_rows, args.out / "metrics.csv")
    report = args.out / "report.md"
    report.write_text("\n".join(stack_eval.report_header(source) + sections), encoding="utf-8")
    return judged, report


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_") or "model"


def _refocuser_model(weights: Path | None, pixel_size_um: float, engine: EngineConfig) -> StackModel:
    """The network as the daemon of this config runs it (its fusion and physics-path settings), on the simulated
    suites' engine (`scoring_engine`), told the stack's pixel size."""
    from acquire_refocus.model.scoring import scoring_engine
    from acquire_refocus.refocuser import Refocuser

    refocuser = Refocuser.load(
        weights, engine=scoring_engine(engine.num_threads, engine.physics_fusion, engine.physics_path)
    )
    refocuser.check_pixel_size_um(pixel_size_um)

    def run(frame: np.ndarray) -> tuple[np.ndarray, float]:
        result = refocuser(frame, pixel_size_um=pixel_size_um)
        return result.image, result.defocus_magnitude_um

    return run
