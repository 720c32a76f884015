"""`acquire-refocus calibrate-focus`: measure, on the user's own z-stacks, how the image sharpness the closed loop
uses (`focus.fine_source: sharpness`) falls with defocus, and print the focus settings that fit those optics."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from acquire_refocus.errors import InputError, UserError
from acquire_refocus.outputs import json_output_file

if TYPE_CHECKING:
    from acquire_refocus.sharpness import BandPassSharpness

_MIN_PLANES = 5
# A field shows focus when the fitted fall of log sharpness over --range-um from the peak is at least 0.05 and
# _MIN_DROP_TO_SCATTER times the planes' scatter about the fit (per degree of freedom, from _MIN_PLANES planes in
# range): 18-63 times on 16 simulated fields (a fall of 0.2-0.7); stacks of camera noise alone, which can fit a
# peak by chance, passed in 1 of 420 tries (5-17 planes, 64 px) and reached 13 otherwise.
_MIN_LOG_SHARPNESS_DROP = 0.05
_MIN_DROP_TO_SCATTER = 15.0

_DESCRIPTION = """\
Measure the band-pass sharpness of every plane of one or more z-stacks through focus and fit, per field of view,
log sharpness = c - (z - peak)^2 / (2 width^2) over the planes within --range-um of the sharpest one. Prints the
sharpest Z and the width per field and the focus settings they call for:

  sharpness_width_um / sharpness_range_um: the median width (the defaults, 4/3 of the depth of field, are a
    guess from the optics; a width set too large makes the loop overshoot, too small slows it);
  target_offset_um: when the stack says which plane you call in focus (--in-focus-index, or a simulated
    dataset), minus the median distance of the sharpest plane from it, so the loop holds your focus rather than
    the sharpest plane.

STACK is a multi-page TIFF (Z, Y, X; one channel, planes in order of stage Z; needs --z-step-um), or a folder
with one subfolder per plane (BBBC006-style, or written by 'acquire-refocus simulate'). Use stacks of the
specimen you will image, at least 5 planes spanning +-4 um or more around focus, with the objective and camera
of the experiment.
"""

_EPILOG = """\
examples:
  acquire-refocus calibrate-focus stack.tif --z-step-um 0.5 --config my-scope.yaml
  acquire-refocus calibrate-focus BBBC006_v1_images/ --z-step-um 2 --in-focus-index 16 --file-pattern '*_w1*'
  acquire-refocus calibrate-focus data/sim --json calibration.json
"""


@dataclass(frozen=True)
class FieldCalibration:
    name: str
    sharpest_plane: int
    peak_z_um: float  # from the labelled focus when there is one, else from the first plane
    width_um: float
    planes_used: int


def add_stack_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, in_focus_use: str) -> None:
    """How a z-stack is read (read_stacks): shared by calibrate-focus and evaluate --stack."""
    parser.add_argument(
        "--z-step-um",
        type=float,
        default=None,
        metavar="S",
        help="stage step between planes (needed except for simulated datasets)",
    )
    parser.add_argument(
        "--in-focus-index",
        type=int,
        default=None,
        metavar="I",
        help=f"the plane you call in focus (0-based), {in_focus_use}",
    )
    parser.add_argument(
        "--pixel-size-um",
        type=float,
        default=None,
        metavar="X",
        help="pixel size at the sample (default: the dataset's, else the config's optics)",
    )
    parser.add_argument(
        "--z-order",
        choices=["increasing", "decreasing"],
        default="increasing",
        help="increasing (default): later planes were taken deeper into the sample",
    )
    parser.add_argument(
        "--file-pattern",
        default=None,
        metavar="GLOB",
        help="plane folders: pick one channel by file name, e.g. '*_w1*'",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("stack", type=Path, metavar="STACK", help="z-stack TIFF file, or folder of plane folders")
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config whose optics: took the stacks (default: built-in)"
    )
    add_stack_arguments(parser, "to suggest target_offset_um")
    parser.add_argument(
        "--range-um",
        type=float,
        default=None,
        metavar="R",
        help="fit the planes within this distance of the sharpest one (default: 4/3 of the depth "
        "of field, as the closed loop)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also plot each field's sharpness against Z with its fit (the focus curve)",
    )


def _read_tiff_stack(path: Path) -> np.ndarray:
    import tifffile

    try:
        stack = np.asarray(tifffile.imread(path))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for non-TIFF or damaged files
        raise InputError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    stack = np.squeeze(stack)
    if stack.ndim == 3 and stack.shape[-1] in (3, 4):
        raise InputError(
            f"{path}: shape {stack.shape} looks like a colour (RGB) image, not a z-stack; save the "
            "planes of one grey-scale channel as a multi-page TIFF"
        )
    if stack.ndim != 3:
        raise InputError(
            f"{path}: expected a z-stack of shape (planes, height, width), got shape {stack.shape}; save one "
            "channel and one time point as a multi-page TIFF"
        )
    return stack


def read_stacks(args: argparse.Namespace) -> tuple[list[tuple[str, np.ndarray]], np.ndarray, float | None, bool]:
    """(name, planes) per field, plane Z (um; 0 = the labelled focus when `labelled`), pixel size, labelled."""
    from acquire_refocus.datasets.zstack import read_zstack_folders

    if args.stack.is_file():
        if args.z_step_um is None:
            raise UserError(f"{args.stack}: give the stage step between planes with --z-step-um")
        planes = _read_tiff_stack(args.stack)
        count = planes.shape[0]
        if args.in_focus_index is not None and not 0 <= args.in_focus_index < count:
            raise UserError(f"--in-focus-index {args.in_focus_index}: the stack has planes 0 .. {count - 1}")
        sign = 1.0 if args.z_order == "increasing" else -1.0
        z_um = sign * (np.arange(count) - (args.in_focus_index or 0)) * args.z_step_um
        return [(args.stack.name, planes)], z_um, None, args.in_focus_index is not None
    if not args.stack.exists():
        raise InputError(f"{args.stack}: no such file or folder")
    if (args.stack / "dataset.json").is_file():
        # simulated: planes and focus from its manifest, which the arguments given must agree with
        if args.file_pattern is not None:
            raise UserError(
                f"{args.stack}: --file-pattern picks a channel in real plane folders; a simulated dataset has one"
            )
        dataset = read_zstack_folders(args.stack, args.in_focus_index, args.z_step_um)
    else:  # real: without --in-focus-index, plane 0 is the reference
        if args.z_step_um is None:
            raise UserError(f"{args.stack}: give the stage step between plane folders with --z-step-um")
        dataset = read_zstack_folders(
            args.stack, args.in_focus_index or 0, args.z_step_um, z_order=args.z_order, file_pattern=args.file_pattern
        )
    labelled = dataset.simulated or args.in_focus_index is not None
    fields = [(f.name, f.planes) for f in dataset]
    return fields, np.asarray(dataset.defocus_um, dtype=float), dataset.pixel_size_um, labelled


def calibrate(
    fields: list[tuple[str, np.ndarray]],
    z_um: np.ndarray,
    sharpness: BandPassSharpness,
    pixel_size_um: float | None,
    range_um: float,
) -> tuple[list[FieldCalibration], list[str]]:
    """Fit each field; the fields that could not be fitted come back as messages."""
    from acquire_refocus.sharpness import fit_sharpness_curve

    results: list[FieldCalibration] = []
    failed: list[str] = []
    for name, planes in fields:
        if planes.shape[0] < _MIN_PLANES:
            raise InputError(f"{name}: {planes.shape[0]} planes; a calibration needs at least {_MIN_PLANES}")
        values = np.array([sharpness(plane, pixel_size_um) for plane in planes])
        log_s = np.full(values.shape, np.nan)
        np.log(values, out=log_s, where=values > 0)  # no band power (a blank plane): not measurable
        curve = fit_sharpness_curve(z_um, log_s, range_um)
        if curve is None:
            failed.append(
                f"{name}: no sharpness peak within {range_um:g} um of the sharpest plane (an empty field, "
                "a stack that does not pass through focus, or fewer than 3 planes in --range-um)"
            )
            continue
        if curve.planes_used < _MIN_PLANES:  # 3 or 4 planes fit a parabola (almost) exactly, noise included
            failed.append(
                f"{name}: {curve.planes_used} planes within {range_um:g} um of the sharpest; the fit needs "
                f"{_MIN_PLANES} to be told from noise: take planes closer together or raise --range-um"
            )
            continue
        drop = (range_um / curve.width_um) ** 2 / 2
        if drop < max(_MIN_LOG_SHARPNESS_DROP, _MIN_DROP_TO_SCATTER * curve.residual_rms):
            failed.append(
                f"{name}: the sharpness falls by {drop:.3f} (log) within {range_um:g} um of its peak, "
                f"not clearly more than the planes scatter ({curve.residual_rms:.3f}): no structure in "
                "focus (camera noise or an empty field)"
            )
            continue
        if not z_um.min() <= curve.peak_z_um <= z_um.max():
            failed.append(f"{name}: the sharpness peaks outside the stack ({curve.peak_z_um:+.2f} um)")
            continue
        results.append(
            FieldCalibration(name, int(np.nanargmax(log_s)), curve.peak_z_um, curve.width_um, curve.planes_used)
        )
    return results, failed


def _plot(
    path: Path,
    fields: list[tuple[str, np.ndarray]],
    z_um: np.ndarray,
    sharpness: BandPassSharpness,
    pixel_size_um: float | None,
    range_um: float,
) -> None:
    """The focus curve of every field (fitted where a peak was found) in one PNG."""
    from acquire_refocus.autofocus import plot_sharpness_curves
    from acquire_refocus.sharpness import fit_sharpness_curve

    curves = []
    for name, planes in fields:
        values = np.array([sharpness(plane, pixel_size_um) for plane in planes])
        log_s = np.full(values.shape, np.nan)
        np.log(values, out=log_s, where=values > 0)
        curves.append((name, z_um, log_s, fit_sharpness_curve(z_um, log_s, range_um)))
    try:
        plot_sharpness_curves(path, curves, f"calibrate-focus: {len(fields)} field(s)")
    except OSError as exc:
        raise UserError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.config import load_config
    from acquire_refocus.sharpness import BandPassSharpness

    config = load_config(args.config)
    for option in ("z_step_um", "pixel_size_um", "range_um"):
        value = getattr(args, option)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{option.replace('_', '-')} must be a positive number, got {value}")
    if args.json is not None:
        json_output_file(args.json)
    fields, z_um, dataset_pixel_um, labelled = read_stacks(args)
    pixel_size_um = args.pixel_size_um or dataset_pixel_um or config.optics.pixel_size_um
    range_um = args.range_um or config.focus.sharpness_settings_um(config.optics)[2]
    sharpness = BandPassSharpness.for_optics(config.optics)
    results, failed = calibrate(fields, z_um, sharpness, pixel_size_um, range_um)
    if args.plot is not None:
        _plot(args.plot, fields, z_um, sharpness, pixel_size_um, range_um)
    for message in failed:
        print(f"skipped {message}")
    if not results:
        raise InputError(f"{args.stack}: no field could be calibrated")

    reference = "labelled focus" if labelled else "plane 0"
    print(
        f"{len(results)} field(s), {len(z_um)} planes {abs(z_um[1] - z_um[0]):g} um apart, pixel "
        f"{pixel_size_um:.4g} um, planes within {range_um:.2f} um of the sharpest fitted"
    )
    print(f"{'field':<28} {'sharpest plane':>14} {'peak Z vs ' + reference:>22} {'width (um)':>11}")
    for r in results:
        print(f"{r.name:<28} {r.sharpest_plane:>14d} {r.peak_z_um:>+22.2f} {r.width_um:>11.2f}")
    width_um = statistics.median(r.width_um for r in results)
    summary: dict[str, object] = {
        "width_um": round(width_um, 3),
        "fields": [asdict(r) for r in results],
        "skipped": failed,
        "pixel_size_um": pixel_size_um,
        "range_um": range_um,
    }
    print("\nfocus settings for these optics and this specimen (config file, section focus:):")
    print(f"  sharpness_width_um: {width_um:.1f}\n  sharpness_range_um: {width_um:.1f}")
    if labelled:
        shift_um = statistics.median(r.peak_z_um for r in results)
        summary["sharpest_minus_focus_um"] = round(shift_um, 3)
        limit_um = width_um / 2
        note = "" if abs(shift_um) <= limit_um else f"; beyond +-{limit_um:.1f} um, half the range: not allowed"
        print(
            f"  target_offset_um: {round(-shift_um, 1) + 0.0:.1f}    # with fine_source sharpness: the sharpest "
            f"plane lies {shift_um:+.2f} um from the labelled focus (+: deeper){note}"
        )
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--json {args.json}: cannot write ({exc.strerror or exc})") from None
        print(f"wrote {args.json}")
    return 0
