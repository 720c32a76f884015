"""`acquire-refocus calibrate-model`: choose where the model's Wiener path is mixed in (model/physics_path.py) on
validation frames of its training envelope, and write the weights with that calibration."""

from __future__ import annotations

import argparse
from pathlib import Path

from acquire_refocus.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Calibrate the physics path of a model: per bin of its estimated |defocus|, the Wiener balance and the share "
        "of Wiener deconvolution (through the same fusion as the network's image) that restore the model's "
        "validation frames best; where none beats the network's own path, the bin keeps the network. It also "
        "chooses, in each bin far from focus, the margin the fusion takes off the estimate before bounding the "
        "image, by the same rules (near focus the model's one margin stays). The frames "
        "are those training validates on: the validation specimens of a simulated envelope (never the test "
        "specimens of 'evaluate'), or the validation sites of a stored dataset (training.data: stored, split "
        "by site as training splits it; the truth is each site's in-focus plane). Writes the weights, unchanged "
        "but for this calibration in their metadata, to --out; the Refocuser uses it when engine.physics_path is "
        "on (the default). Takes minutes on a CPU."
    )
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="the YAML config the weights were trained with (its training, optics and simulator sections)",
    )
    parser.add_argument(
        "--weights", type=Path, default=None, metavar="W", help="weights to calibrate (default: the shipped model)"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="W2", help="where to write the calibrated weights")
    parser.add_argument(
        "--fields",
        type=int,
        default=24,
        metavar="N",
        help="simulated envelopes: validation fields of view, 19 frames each (default 24); a stored dataset: "
        "all its validation sites",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.config import load_config
    from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS
    from acquire_refocus.model.physics_path import calibrate_weights

    if args.fields < 1:
        raise UserError(f"--fields must be at least 1, got {args.fields}")
    if args.weights is not None and not args.weights.is_file():
        raise UserError(f"--weights {args.weights} not found")
    if args.out.resolve() == (args.weights or DEFAULT_WEIGHTS).resolve():
        raise UserError("--out must differ from --weights (or the shipped model): the weights given stay as they are")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give the weights file to write")
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists; give --force to replace it, or another --out")
    _check_writable(args.out)
    config = load_config(args.config)
    try:
        calibration = calibrate_weights(config, args.weights, args.out, args.fields)
    except OSError as exc:
        raise UserError(f"could not write {args.out}: {exc.strerror or exc}") from None
    edges = ("0", *(f"{edge:g}" for edge in calibration.bin_edges_um), "")
    header = f"{'estimated |d| (um)':<20} {'share':>6}  {'balance':>7}  {'margin':>6}  "
    print(f"{header}{'gain, mixed / network alone (dB)':<33}{'frames':>7}  ({calibration.source})")
    for index, share in enumerate(calibration.shares):
        span = f"{edges[index]}-{edges[index + 1]}" if edges[index + 1] else f">= {edges[index]}"
        balance = f"{calibration.balances[index]:g}" if share > 0 else "-"
        if calibration.frames[index] == 0:
            gains = "no validation frame read this"
        else:
            gains = f"{calibration.mean_gain_db[index]:+6.2f} / {calibration.network_gain_db[index]:+6.2f}"
        margin = f"{calibration.margins_um[index]:g}" if calibration.margins_um else "-"
        print(f"{span:<20} {share:6.2f}  {balance:>7}  {margin:>6}  {gains:<33}{calibration.frames[index]:7d}")
    print(f"calibrated weights: {args.out}")
    return 0


def _check_writable(out: Path) -> None:
    """UserError now, before minutes of calibration, when --out cannot be written: its folder is created (as the
    write would) and must accept a file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder of --out {out}: {exc.strerror or exc}") from None
    probe = out.parent / f".{out.name}.write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write into {out.parent}: {exc.strerror or exc}") from None
