"""`acquire-refocus correct`: refocus TIFF files offline and estimate their defocus."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from acquire_refocus.errors import InputError, UserError
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Refocus single-plane TIFF images with the refocus network and estimate how far out of focus each one was. "
        "Writes one float32 TIFF per input (same name, in the frame's intensity units) and DIR/defocus.csv with "
        "columns file,defocus_um,confidence. defocus_um = stage Z at acquisition minus stage Z in focus: moving "
        "the focus stage by -defocus_um would have put the image in focus. A file that cannot be read is "
        "reported and skipped; the others are still processed."
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN.tif", help="2-D TIFF images (uint8/uint16/float)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--pixel-size-um", type=float, default=None, metavar="X",
                        help="pixel size at the sample; frames are resampled to the model's (default: the model's)")
    parser.add_argument("--weights", type=Path, default=None, metavar="W",
                        help="weights file from 'acquire-refocus train' (default: the shipped model)")
    parser.add_argument("--engine", default="auto", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                        help="inference backend (default: auto = the fastest one that works here)")


def _read_image(path: Path) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        image = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for non-TIFF or damaged files
        raise InputError(f"{path}: not a readable TIFF image ({type(exc).__name__}: {exc})") from None
    image = np.asarray(image)
    if image.ndim > 2 and sum(s > 1 for s in image.shape) == 2:
        image = image.squeeze()
    if image.ndim != 2:
        raise InputError(f"{path}: expected a single 2-D plane, got an image of shape {image.shape}")
    return image


def run(args: argparse.Namespace) -> int:
    import tifffile

    from acquire_refocus.refocuser import Refocuser

    if args.pixel_size_um is not None and not args.pixel_size_um > 0:
        raise UserError(f"--pixel-size-um must be positive, got {args.pixel_size_um}")
    refocuser = Refocuser.load(args.weights, engine=args.engine)
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    rows: list[tuple[str, float, float]] = []
    written: set[str] = set()
    for path in args.inputs:
        try:
            frame = _read_image(path)
            result = refocuser(frame, pixel_size_um=args.pixel_size_um)
        except InputError as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            log.error(kv("correct_failed", file=path, reason=message))
            failed.append((path, message))
            continue
        stem = path.stem
        suffix = 2
        while stem in written:  # same file name from two folders: keep both
            stem = f"{path.stem}_{suffix}"
            suffix += 1
        written.add(stem)
        target = args.out / f"{stem}.tif"
        tifffile.imwrite(target, result.image, photometric="minisblack",
                         metadata={"defocus_um": result.defocus_um, "confidence": result.confidence,
                                   "model_sha256": refocuser.model_sha256})
        rows.append((path.name, result.defocus_um, result.confidence))
        log.info(kv("corrected", file=path, out=target, defocus_um=f"{result.defocus_um:.2f}",
                    confidence=f"{result.confidence:.2f}"))
    with (args.out / "defocus.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "defocus_um", "confidence"])
        for name, defocus_um, confidence in rows:
            writer.writerow([name, f"{defocus_um:.3f}", f"{confidence:.3f}"])
    print(f"refocused {len(rows)} of {len(args.inputs)} file(s) into {args.out} (defocus.csv lists the estimates)")
    if failed:
        raise UserError(f"{len(failed)} file(s) could not be processed:\n  " + "\n  ".join(m for _, m in failed))
    return 0
