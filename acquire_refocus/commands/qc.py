"""`acquire-refocus qc DIR`: the focus-quality report of a `correct DATASET --out DIR` run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write the focus-quality report of a finished 'acquire-refocus correct DATASET --out DIR' run into DIR/qc: "
        "plate.png (median |defocus| per site, sites as a grid inside each well), trace.png (per position over "
        "time), histogram.png, worst.png (the worst frames, raw beside refocused), reimage.csv (frames above the "
        "threshold) and report.md linking them. Reads DIR/focus.parquet and, for the montage, the dataset."
    )
    parser.add_argument("out", type=Path, metavar="DIR", help="the --out folder of a 'correct DATASET' run")
    parser.add_argument(
        "--threshold-um",
        type=float,
        default=None,
        metavar="X",
        help="frames whose |defocus| exceeds X um go to reimage.csv (default 5)",
    )


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.reprocess.report import write_report

    print(f"focus-quality report: {write_report(args.out, threshold_um=args.threshold_um)}")
    return 0
