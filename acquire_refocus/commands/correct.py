"""`acquire-refocus correct`: refocus a dataset or plate (on a Dask cluster) or TIFF files offline, and estimate
their defocus. One dataset path goes to `acquire_refocus.reprocess`; a list of 2-D TIFF files is handled here."""

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


# Options that only a dataset run uses: given with a list of 2-D TIFF files they are refused, not ignored.
_DATASET_OPTIONS = ("no_images", "csv", "scheduler", "workers", "channel", "batch_frames", "qc", "threshold_um")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "DATASET: refocus a whole dataset (an .ome.zarr folder, this daemon's raw.ome.zarr included, an NDTiff "
        "folder, an OME-TIFF or multi-page TIFF, or a folder of single-plane TIFFs named like BBBC's "
        "..._A01_s1_w1....tif) on a Dask cluster, and write DIR/focus.parquet (one row per frame: axes, well and "
        "site, defocus_magnitude_um, defocus_um, confidence, sharpness, status, reason) and DIR/refocused.ome.zarr "
        "(float32, same axes and chunks). The input is never modified. Rerun the same command to resume an "
        "interrupted run. "
        "IN.tif ...: refocus single-plane TIFF images with the refocus network and estimate how far out of focus "
        "each one was. "
        "Writes one float32 TIFF per input (same name, in the frame's intensity units) and DIR/defocus.csv with "
        "columns file,defocus_um,confidence (file: the input path as given). defocus_um = stage Z at acquisition "
        "minus stage Z in focus: moving the focus stage by -defocus_um would have put the image in focus. A file "
        "that cannot be read is reported and skipped; the others are still processed. Files already in DIR are "
        "never replaced: if a result's name is taken, choose another DIR."
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="DATASET | IN.tif",
        help="one dataset path, or 2-D TIFF images (uint8/uint16/float)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder (created if needed; files already there are never replaced)",
    )
    parser.add_argument(
        "--pixel-size-um",
        type=float,
        default=None,
        metavar="X",
        help="pixel size at the sample; frames are resampled to the model's (default: a dataset's "
        "metadata; for TIFF files, the model's)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="W",
        help="weights file from 'acquire-refocus train' (default: the shipped model)",
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "tensorrt", "onnxruntime", "torch"],
        help="inference backend (default: auto = the fastest one that works here, per worker)",
    )
    parser.add_argument(
        "--allow-harmful-model",
        action="store_true",
        help="write refocused images even when the model's recorded evaluation ('evaluate "
        "--record') says it harms at some distance (otherwise refused; --no-images is allowed)",
    )
    dataset = parser.add_argument_group("dataset runs")
    dataset.add_argument(
        "--channel",
        action="append",
        metavar="NAME",
        help="correct this channel (repeat for more; default: all); other channels get 'skipped' rows",
    )
    dataset.add_argument(
        "--no-images", action="store_true", help="estimates only: write the focus table, not refocused.ome.zarr"
    )
    dataset.add_argument("--csv", action="store_true", help="also write DIR/focus.csv")
    dataset.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="run on this Dask cluster (default: Dask's scheduler-address setting, else an embedded "
        "cluster on this machine)",
    )
    dataset.add_argument(
        "--workers", type=int, metavar="N", help="worker processes of the embedded cluster (default: one per 4 cores)"
    )
    dataset.add_argument(
        "--batch-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames per task (rounded up to whole output chunks; default 8)",
    )
    dataset.add_argument(
        "--qc", action="store_true", help="also write the focus-quality report into DIR/qc (see 'acquire-refocus qc')"
    )
    dataset.add_argument(
        "--threshold-um",
        type=float,
        default=None,
        metavar="X",
        help="with --qc: list frames whose |defocus| exceeds X um for re-imaging (default 5)",
    )


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
            raise UserError(
                f"--out {out}: the result {target} would overwrite the input "
                f"{sources[target.resolve()]}; choose another --out"
            )
    existing = [str(p) for p in [*targets, out / CSV_NAME] if p.exists()]
    if existing:
        raise UserError(
            f"--out {out} already holds {', '.join(existing)}; results are never written over "
            "existing files: choose another --out"
        )
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
        raise UserError(
            f"cannot write {path}: {exc.strerror or exc}; results written before it stay in "
            f"{path.parent}; choose another --out"
        ) from None


def _is_dataset(inputs: list[Path]) -> bool:
    """One folder, or one TIFF holding more than one plane: a dataset. Anything else: a list of 2-D TIFF files."""
    if len(inputs) != 1:
        return False
    path = inputs[0]
    if path.is_dir():
        return True
    if path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
        from acquire_refocus.reprocess.tiff import describe

        try:
            return describe(path).frame_count > 1
        except InputError:
            return False  # the file-by-file path reports it as an unreadable image
    return False


def _run_dataset(args: argparse.Namespace) -> int:
    import dask

    from acquire_refocus.reprocess.runner import Options, reprocess

    batch_frames = 8 if args.batch_frames is None else args.batch_frames
    if (args.workers is not None and args.workers < 1) or batch_frames < 1:
        raise UserError("--workers and --batch-frames must be at least 1")
    if not args.no_images:
        _refuse_harmful_model(args.weights, None, args.allow_harmful_model)
    scheduler = args.scheduler or dask.config.get("scheduler-address", None)
    summary = reprocess(
        Options(
            dataset=args.inputs[0],
            out=args.out,
            weights=args.weights,
            engine=args.engine,
            pixel_size_um=args.pixel_size_um,
            channels=tuple(args.channel or ()),
            images=not args.no_images,
            csv=args.csv,
            scheduler=scheduler,
            workers=args.workers,
            batch_frames=batch_frames,
        )
    )
    counts = summary.counts
    if summary.already_complete:
        print(f"{args.out} already holds the finished run of {args.inputs[0]}; nothing to do")
    else:
        resumed = f", {summary.frames_before} done by an earlier run" if summary.frames_before else ""
        print(
            f"{summary.frames} frame(s) of {args.inputs[0]} ({summary.info.kind}): {counts['refocused']} refocused, "
            f"{counts['failed']} failed, {counts['skipped']} skipped; computed {summary.frames_computed} now"
            f"{resumed}. Table: {args.out / 'focus.parquet'}"
            + ("" if args.no_images else f", images: {args.out / 'refocused.ome.zarr'}")
        )
    if args.qc:
        from acquire_refocus.reprocess.report import write_report

        report = write_report(args.out, threshold_um=args.threshold_um)
        print(f"focus-quality report: {report}")
    if counts["failed"]:
        raise UserError(
            f"{counts['failed']} frame(s) could not be refocused; their rows in focus.parquet say why "
            "(status 'failed', column 'reason')"
        )
    return 0


def _refuse_harmful_model(weights: Path | None, sha256: str | None, allowed: bool) -> None:
    """UserError before any work when the model's recorded evaluation says it harms somewhere (model/verdict.py)."""
    from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS
    from acquire_refocus.model.verdict import check_model, file_sha256

    path = weights or DEFAULT_WEIGHTS
    if not path.is_file():
        return  # loading the weights reports it
    check = check_model(
        path,
        sha256 or file_sha256(path),
        allowed,
        "--allow-harmful-model writes them anyway, --no-images (datasets) writes the estimates only",
    )
    if check.refusal is not None:
        raise UserError(check.refusal)


def run(args: argparse.Namespace) -> int:
    if _is_dataset(args.inputs):
        return _run_dataset(args)
    given = [name for name in _DATASET_OPTIONS if getattr(args, name) not in (None, False)]
    if given:
        raise UserError(
            f"--{given[0].replace('_', '-')} applies to a dataset (one folder or multi-plane TIFF), not "
            "to a list of 2-D TIFF files"
        )
    return _run_files(args)


def _run_files(args: argparse.Namespace) -> int:
    import tifffile

    from acquire_refocus.refocuser import Refocuser

    refocuser = Refocuser.load(args.weights, engine=args.engine)
    _refuse_harmful_model(refocuser.loaded.path, refocuser.model_sha256, args.allow_harmful_model)
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
        tifffile.imwrite(
            tiff,
            result.image,
            photometric="minisblack",
            metadata={
                "defocus_um": result.defocus_um,
                "confidence": result.confidence,
                "model_sha256": refocuser.model_sha256,
            },
        )
        _write_new(target, tiff.getvalue())
        rows.append([str(path), f"{result.defocus_um:.3f}", f"{result.confidence:.3f}"])
        log.info(
            kv(
                "corrected",
                file=path,
                out=target,
                defocus_um=f"{result.defocus_um:.2f}",
                confidence=f"{result.confidence:.2f}",
            )
        )
    if not rows:  # nothing to report: leave the disk as it was, so a rerun with fixed files can use the same --out
        if created_out:
            args.out.rmdir()
        raise UserError(
            f"none of the {len(failed)} file(s) could be processed, nothing was written:\n  " + "\n  ".join(failed)
        )
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["file", "defocus_um", "confidence"])
    writer.writerows(rows)
    _write_new(args.out / CSV_NAME, table.getvalue().encode("utf-8"))
    print(f"refocused {len(rows)} of {len(args.inputs)} file(s) into {args.out} ({CSV_NAME} lists the estimates)")
    if failed:
        raise UserError(f"{len(failed)} file(s) could not be processed:\n  " + "\n  ".join(failed))
    return 0
