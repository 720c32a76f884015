"""`acquire-refocus correct`: refocus TIFF files offline and estimate their defocus."""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

import numpy as np

from acquire_refocus.errors import InputError, UserError
from acquire_refocus.logs import kv
from acquire_refocus.outputs import output_folder

log = logging.getLogger(__name__)

CSV_NAME = "defocus.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Refocus single-plane TIFF images with the refocus network and estimate how far out of focus each one was. "
        "Writes one float32 TIFF per input (same name, in the frame's intensity units) and DIR/defocus.csv with "
        "columns file,defocus_um,confidence (file: the input path as given). defocus_um = stage Z at acquisition "
        "minus stage Z in focus: moving the focus stage by -defocus_um would have put the image in focus. A file "
        "that cannot be read is reported and skipped; the others are still processed. Files already in DIR are "
        "never replaced: if a result's name is taken, choose another DIR."
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN.tif", help="2-D TIFF images (uint8/uint16/float)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder (created if needed; files already there are never replaced)")
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


def _targets(inputs: list[Path], out: Path) -> list[Path]:
    """Each input's output TIFF, checked before any work so nothing the user has is ever replaced.

    The same file name from two folders gets `_2`, `_3`, ... (compared case-insensitively, so two names cannot
    land on one file on macOS or Windows). Refuses a target that is an input or that exists, and an existing
    DIR/defocus.csv: an earlier run's results stay as they are.
    """
    targets: list[Path] = []
    taken: set[str] = set()
    for path in inputs:
        stem = path.stem
        suffix = 2
        while stem.casefold() in taken:
            stem = f"{path.stem}_{suffix}"
            suffix += 1
        taken.add(stem.casefold())
        targets.append(out / f"{stem}.tif")
    sources = {path.resolve(): path for path in inputs}
    for target in targets:
        if target.resolve() in sources:
            raise UserError(f"--out {out}: the result {target} would overwrite the input "
                            f"{sources[target.resolve()]}; choose another --out")
    existing = [str(p) for p in [*targets, out / CSV_NAME] if p.exists()]
    if existing:
        raise UserError(f"--out {out} already holds {', '.join(existing)}; results are never written over "
                        "existing files: choose another --out")
    return targets


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` holding `data`. Exclusive creation keeps a file that appeared since `_targets` checked, and a
    failed write (disk full) leaves no partial file that could pass for a result."""
    try:
        with path.open("xb") as handle:
            try:
                handle.write(data)
            except BaseException:
                handle.close()
                path.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; results written before it stay in "
                        f"{path.parent}; choose another --out") from None


def run(args: argparse.Namespace) -> int:
    import tifffile

    from acquire_refocus.refocuser import Refocuser

    refocuser = Refocuser.load(args.weights, engine=args.engine)
    refocuser.check_pixel_size_um(args.pixel_size_um)  # once, not as a failure of every file
    created_out = not args.out.exists()
    output_folder(args.out, "--out")
    targets = _targets(args.inputs, args.out)
    failed: list[str] = []
    rows: list[list[str]] = []
    for path, target in zip(args.inputs, targets, strict=True):
        try:
            frame = _read_image(path)
            result = refocuser(frame, pixel_size_um=args.pixel_size_um)
        except InputError as exc:
            failed.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
            log.warning(kv("correct_skipped", file=path))  # the reason is in the final error, once
            continue
        tiff = io.BytesIO()
        tifffile.imwrite(tiff, result.image, photometric="minisblack",
                         metadata={"defocus_um": result.defocus_um, "confidence": result.confidence,
                                   "model_sha256": refocuser.model_sha256})
        _write_new(target, tiff.getvalue())
        rows.append([str(path), f"{result.defocus_um:.3f}", f"{result.confidence:.3f}"])
        log.info(kv("corrected", file=path, out=target, defocus_um=f"{result.defocus_um:.2f}",
                    confidence=f"{result.confidence:.2f}"))
    if not rows:  # nothing to report: leave the disk as it was, so a rerun with fixed files can use the same --out
        if created_out:
            args.out.rmdir()
        raise UserError(f"none of the {len(failed)} file(s) could be processed, nothing was written:\n  "
                        + "\n  ".join(failed))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["file", "defocus_um", "confidence"])
    writer.writerows(rows)
    _write_new(args.out / CSV_NAME, table.getvalue().encode("utf-8"))
    print(f"refocused {len(rows)} of {len(args.inputs)} file(s) into {args.out} ({CSV_NAME} lists the estimates)")
    if failed:
        raise UserError(f"{len(failed)} file(s) could not be processed:\n  " + "\n  ".join(failed))
    return 0
