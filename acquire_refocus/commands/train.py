"""`acquire-refocus train`: train the refocus network and its autofocus head."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the refocus U-Net (in-focus image + signed defocus estimate) on z-stacks with known defocus: "
        "rendered on the fly by the simulated microscope (training.data: simulated, the default) or read from a "
        "stored dataset (training.data: stored, training.dataset_dir: simulated or BBBC006-style folders). "
        "Fields of view are split between training and validation, never planes. The run folder gets "
        "checkpoint.pt (resume from it), weights.pt (use it: --weights / model.weights), history.csv and config.yaml."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML config (sections model, loss, training, optics, simulator); default: built-in",
    )
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="override training.steps")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="run folder (default: training.checkpoint_dir)"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="CKPT",
        help="continue from a checkpoint.pt of an earlier run with the same model settings",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.config import load_config
    from acquire_refocus.errors import UserError
    from acquire_refocus.model.train import train

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    config = load_config(args.config)
    result = train(config, out_dir=args.out, steps=args.steps, resume=args.resume, progress=not args.no_progress)
    last = result.history[-1] if result.history else None
    summary = f"trained {result.steps} steps in {result.wall_time_s / 60:.1f} min; weights: {result.weights_path}"
    if last is not None:
        summary += (
            f"\nvalidation: PSNR gain {last.psnr_gain_db:+.2f} dB, defocus MAE {last.defocus_mae_um:.2f} um, "
            f"|d| MAE {last.magnitude_mae_um:.2f} um"
        )
    print(summary)
    return 0
