"""`acquire-refocus evaluate`: compare refocus networks with the raw input and deconvolution baselines."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML config (optics and simulator sections); default: built-in simulated microscope")
    parser.add_argument("--weights", type=_weights_argument, action="append", default=None, metavar="[LABEL=]W",
                        help="a weights file to evaluate, optionally labelled; repeat for several "
                        "(default: the shipped model)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder (created if needed)")
    parser.add_argument("--fields", type=int, default=6, metavar="N", help="test fields of view (default 6)")
    parser.add_argument("--size-px", type=int, default=256, metavar="PX", help="test frame size (default 256)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the deconvolution baselines (the slow part)")
    parser.add_argument("--no-tilt", action="store_true", help="skip the tilted-sample setting")
    parser.add_argument("--suite", choices=("heldout", "ood"), default="heldout",
                        help="heldout (default): the simulator's held-out specimens with deconvolution baselines; "
                        "ood: the out-of-distribution sets (a real nuclei image, a second PSF model, 20 to 5,000 "
                        "photons, a held-out specimen family) with a physics-informed method (model/ood.py)")


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.config import load_config
    from acquire_refocus.errors import UserError
    from acquire_refocus.model.evaluate import TILT_DISTANCES_UM, run_evaluation

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
    if args.suite == "ood":
        from acquire_refocus.model.ood import run_ood_evaluation

        report = run_ood_evaluation(config, weights, args.out, fields=args.fields, window_px=args.size_px,
                                    physics=not args.no_baselines)
    else:
        report = run_evaluation(config, weights, args.out, fields=args.fields, window_px=args.size_px,
                                tilt_distances_um=() if args.no_tilt else TILT_DISTANCES_UM,
                                baselines=not args.no_baselines)
    print(f"report: {report}")
    return 0
