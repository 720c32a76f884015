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

# Sharpness bands tried, as multiples of the optics' resolution (0.61 lambda / NA; 1 is the loop's default). The
# simulated nuclei, textured down to 0.5 um, show focus best in the optics' band at 20x / 0.45 and 10x, in 2x it
# at 20x / 0.75 and in 5x it at 40x to 100x; the scans per preset are in tools/reports/presets/README.md.
_BAND_SCALES = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
# Without --range-um the fit range follows the fitted width (the loop's sharpness_range_um is set to the width) for
# at most this many refits, stopping within _RANGE_TOLERANCE of it; a range where no field fits is doubled first.
_RANGE_REFITS = 4
_RANGE_TOLERANCE = 0.05
# Bands that calibrate at least _FIELDS_TOLERANCE of the most fields any band does compete. The optics' band, which
# the closed-loop tests validate, stays unless its noise_um2 is over _DEFAULT_NOISE_TOLERANCE times their least;
# otherwise the finest band within _NOISE_TOLERANCE of the least. On the simulated nuclei: at 20x / 0.45 the optics'
# band (7 of 8 fields) stays against 0.94 um (8 of 8), whose settings held the demo's focus less steadily (sd
# 0.44-0.72 um per position against 0.38-0.55 over 3 seeds); at 100x it fits 4 of 8 at 1.0 um^2 against 0.14; at
# 60x it fits 1 field where 1.0 um fits 3, and 1.0 um (0.10 um^2) held the mid-plane closer than 1.61 um (0.09)
# in 3 of 3 demo seeds (tools/reports/presets/README.md).
_FIELDS_TOLERANCE = 0.75
_DEFAULT_NOISE_TOLERANCE = 2.0
_NOISE_TOLERANCE = 1.25

# Beyond these a number is a typo (um for nm, a wrong unit), not a microscope: refused with a message.
_MAX_Z_STEP_UM = 100.0
_PIXEL_SIZE_RANGE_UM = (0.01, 100.0)
_WIDTH_RANGE_UM = (0.05, 100.0)  # widths calibrate-focus recommends; the config takes (0, 100]

_DESCRIPTION = """\
Measure the band-pass sharpness of every plane of one or more z-stacks through focus and fit, per field of view,
log sharpness = c - (z - peak)^2 / (2 width^2) over the planes within --range-um of the sharpest one. The sharpness
is measured in several bands of spatial frequency (1 to 8 times the optics' resolution 0.61 lambda / NA). Of the
bands that calibrate at least 3/4 of the most fields any band does, the optics' band (the closed loop's default)
is kept unless its focus is over twice as noisy as the least noisy one's (the table's last column: the spread of
the focus two dithered frames give, from the planes' scatter about the fit and the width); otherwise the finest
band within 1.25 times the least noisy is recommended (a finer band weighs structure at other depths less).
Prints the sharpest Z and the width per field and the focus settings they call for:

  sharpness_band_um: the band (null: the optics' resolution); a specimen without detail at the resolution of a
    high-NA objective shows focus only in a coarser one;
  sharpness_width_um / sharpness_range_um: the median width (the defaults, 4/3 of the depth of field, are a
    guess from the optics; a width set too large makes the loop overshoot, too small slows it); without
    --range-um the fit range follows the width;
  sharpness_dither_um: where the default dither (a tenth of the depth of field) leaves the fit of two dithered
    frames noisier than half the depth of field, the dither that brings it there (at most the depth of field and
    a quarter of the width: where that is not enough, use z-stacks);
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
    scatter: float  # rms of log sharpness about the fit, per degree of freedom


@dataclass(frozen=True)
class BandCalibration:
    """The fit of every field in one sharpness band."""

    band_um: float
    range_um: float
    fields: list[FieldCalibration]
    skipped: list[str]

    @property
    def width_um(self) -> float:
        return statistics.median(f.width_um for f in self.fields)

    @property
    def noise_um2(self) -> float:
        """Median scatter x width^2: two frames +-d apart put the sharpest Z within about noise_um2 / (sqrt 2 d)
        (one standard deviation), so the smaller, the less the loop's dither needs to be."""
        return statistics.median(f.scatter * f.width_um**2 for f in self.fields)

    def pair_noise_um(self, dither_um: float) -> float:
        return self.noise_um2 / (math.sqrt(2) * dither_um) if dither_um > 0 else math.inf


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
        help="fit the planes within this distance of the sharpest one (default: start at 4/3 of the depth "
        "of field, as the closed loop, and follow the fitted width)",
    )
    parser.add_argument(
        "--band-um",
        type=float,
        default=None,
        metavar="B",
        help="measure sharpness in this band only (focus.sharpness_band_um; default: try 1 to 8 times the "
        "optics' resolution and recommend one)",
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


def log_sharpness(
    fields: list[tuple[str, np.ndarray]], sharpness: BandPassSharpness, pixel_size_um: float | None
) -> list[tuple[str, np.ndarray]]:
    """Log sharpness of every plane per field; NaN where a plane has no band power (blank: not measurable)."""
    measured = []
    for name, planes in fields:
        if planes.shape[0] < _MIN_PLANES:
            raise InputError(f"{name}: {planes.shape[0]} planes; a calibration needs at least {_MIN_PLANES}")
        values = np.array([sharpness(plane, pixel_size_um) for plane in planes])
        log_s = np.full(values.shape, np.nan)
        np.log(values, out=log_s, where=values > 0)
        measured.append((name, log_s))
    return measured


def calibrate(
    measured: list[tuple[str, np.ndarray]], z_um: np.ndarray, range_um: float
) -> tuple[list[FieldCalibration], list[str]]:
    """Fit each field's log sharpness; the fields that could not be fitted come back as messages."""
    from acquire_refocus.sharpness import fit_sharpness_curve

    results: list[FieldCalibration] = []
    failed: list[str] = []
    for name, log_s in measured:
        curve = fit_sharpness_curve(z_um, log_s, range_um)
        if curve is None:
            failed.append(
                f"{name}: no sharpness peak within {range_um:.2f} um of the sharpest plane (an empty field, "
                "a stack that does not pass through focus, or fewer than 3 planes in --range-um)"
            )
            continue
        if curve.planes_used < _MIN_PLANES:  # 3 or 4 planes fit a parabola (almost) exactly, noise included
            failed.append(
                f"{name}: {curve.planes_used} planes within {range_um:.2f} um of the sharpest; the fit needs "
                f"{_MIN_PLANES} to be told from noise: take planes closer together or raise --range-um"
            )
            continue
        drop = (range_um / curve.width_um) ** 2 / 2
        if drop < max(_MIN_LOG_SHARPNESS_DROP, _MIN_DROP_TO_SCATTER * curve.residual_rms):
            failed.append(
                f"{name}: the sharpness falls by {drop:.3f} (log) within {range_um:.2f} um of its peak, less "
                f"than {_MIN_LOG_SHARPNESS_DROP:g} or {_MIN_DROP_TO_SCATTER:g} times the planes' scatter about the "
                f"fit ({curve.residual_rms:.3f}): no structure in focus (camera noise or an empty field)"
            )
            continue
        if not z_um.min() <= curve.peak_z_um <= z_um.max():
            failed.append(f"{name}: the sharpness peaks outside the stack ({curve.peak_z_um:+.2f} um)")
            continue
        results.append(
            FieldCalibration(
                name,
                int(np.nanargmax(log_s)),
                curve.peak_z_um,
                curve.width_um,
                curve.planes_used,
                curve.residual_rms,
            )
        )
    return results, failed


def calibrate_band(
    measured: list[tuple[str, np.ndarray]], z_um: np.ndarray, band_um: float, range_um: float, follow_width: bool
) -> BandCalibration:
    """Fit every field in one band over `range_um`; with `follow_width`, move the range to the fitted width (the
    loop's sharpness_range_um) while that fits as many fields, doubling it first while no field fits and the stack
    is long enough."""
    results, failed = calibrate(measured, z_um, range_um)
    if follow_width:
        half_extent_um = float(np.ptp(z_um)) / 2
        while not results and range_um * 2 <= half_extent_um:
            range_um *= 2
            results, failed = calibrate(measured, z_um, range_um)
        for _ in range(_RANGE_REFITS):
            if not results:
                break
            width_um = statistics.median(r.width_um for r in results)
            if abs(width_um - range_um) <= _RANGE_TOLERANCE * range_um:
                break
            refit = calibrate(measured, z_um, width_um)
            if len(refit[0]) < len(results):  # a range that loses fields is not the better one
                break
            range_um, (results, failed) = width_um, refit
    return BandCalibration(band_um, range_um, results, failed)


def best_band(bands: list[BandCalibration]) -> BandCalibration | None:
    """Of the bands that calibrate nearly the most fields (_FIELDS_TOLERANCE): the first (the optics' band, the
    loop's default) unless its noise_um2 is more than _DEFAULT_NOISE_TOLERANCE times their least, else the finest
    within _NOISE_TOLERANCE of it (a finer band weighs structure at other depths less). None when no band
    calibrates a field."""
    most = max((len(b.fields) for b in bands), default=0)
    if most == 0:
        return None
    candidates = [b for b in bands if len(b.fields) >= _FIELDS_TOLERANCE * most]
    least = min(b.noise_um2 for b in candidates)
    if bands[0] in candidates and bands[0].noise_um2 <= _DEFAULT_NOISE_TOLERANCE * least:
        return bands[0]
    return min((b for b in candidates if b.noise_um2 <= _NOISE_TOLERANCE * least), key=lambda b: b.band_um)


def _plot(path: Path, measured: list[tuple[str, np.ndarray]], z_um: np.ndarray, range_um: float, title: str) -> None:
    """The focus curve of every field (fitted where a peak was found) in one PNG."""
    from acquire_refocus.autofocus import plot_sharpness_curves
    from acquire_refocus.sharpness import fit_sharpness_curve

    curves = [(name, z_um, log_s, fit_sharpness_curve(z_um, log_s, range_um)) for name, log_s in measured]
    try:
        plot_sharpness_curves(path, curves, title)
    except OSError as exc:
        raise UserError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {path}")


def _print_bands(
    bands: list[BandCalibration], chosen: BandCalibration, optics_band_um: float, dither_um: float
) -> None:
    print(
        f"{'sharpness band':<22} {'fields':>8} {'range (um)':>11} {'width (um)':>11} {'scatter':>8} "
        f"{f'focus sd, 2 frames +-{dither_um:.2g} um':>30}"
    )
    for band in bands:
        label = f"{band.band_um:.2f} um" + (" (optics)" if band.band_um == optics_band_um else "")
        label += " <" if band is chosen else ""
        if not band.fields:
            print(f"{label:<22} {'0':>8}   (no field shows a focus peak in this band)")
            continue
        scatter = statistics.median(f.scatter for f in band.fields)
        print(
            f"{label:<22} {len(band.fields):>8d} {band.range_um:>11.2f} {band.width_um:>11.2f} {scatter:>8.4f} "
            f"{band.pair_noise_um(dither_um):>27.2f} um"
        )
    print(
        "< recommended: of the bands that fit at least 3/4 of the most fields, the optics' band unless its focus sd "
        "is over 2x the least, else the finest band within 1.25x the least (calibrate-focus --help)\n"
    )


def _setting_um(value: float) -> str:
    """A length for a YAML line: 0.1 um steps from 1 um on, two significant digits below (never an exponent)."""
    return f"{value:.1f}" if value >= 1.0 else f"{value:.2f}"


def _check_arguments(args: argparse.Namespace) -> None:
    from acquire_refocus.config import MAX_SHARPNESS_BAND_UM, MIN_SHARPNESS_BAND_UM

    for option in ("z_step_um", "pixel_size_um", "range_um", "band_um"):
        value = getattr(args, option)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{option.replace('_', '-')} must be a positive number, got {value}")
    if args.z_step_um is not None and args.z_step_um > _MAX_Z_STEP_UM:
        raise UserError(
            f"--z-step-um {args.z_step_um:g}: the planes of a focus stack lie at most {_MAX_Z_STEP_UM:g} um apart"
        )
    low, high = _PIXEL_SIZE_RANGE_UM
    if args.pixel_size_um is not None and not low <= args.pixel_size_um <= high:
        raise UserError(
            f"--pixel-size-um {args.pixel_size_um:g}: give the pixel size at the sample, {low:g} to {high:g} um"
        )
    if args.band_um is not None and not MIN_SHARPNESS_BAND_UM <= args.band_um <= MAX_SHARPNESS_BAND_UM:
        raise UserError(
            f"--band-um {args.band_um:g}: focus.sharpness_band_um takes {MIN_SHARPNESS_BAND_UM:g} to "
            f"{MAX_SHARPNESS_BAND_UM:g} um"
        )
    if args.json is not None:
        json_output_file(args.json)
    if args.plot is not None and not args.plot.parent.is_dir():
        raise UserError(f"--plot {args.plot}: the folder {args.plot.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.config import MAX_SHARPNESS_BAND_UM, MIN_SHARPNESS_BAND_UM, load_config
    from acquire_refocus.sharpness import BandPassSharpness, resolution_um

    config = load_config(args.config)
    _check_arguments(args)
    fields, z_um, dataset_pixel_um, labelled = read_stacks(args)
    pixel_size_um = args.pixel_size_um or dataset_pixel_um or config.optics.pixel_size_um
    dither_um, _, default_range_um = config.focus.sharpness_settings_um(config.optics)
    optics_band_um = resolution_um(config.optics)
    band_list = (
        [args.band_um]
        if args.band_um is not None
        else [
            scale * optics_band_um
            for scale in _BAND_SCALES
            if MIN_SHARPNESS_BAND_UM <= scale * optics_band_um <= MAX_SHARPNESS_BAND_UM
        ]
    )
    measured, bands = [], []
    for band_um in band_list:
        measured.append(log_sharpness(fields, BandPassSharpness(band_um, config.optics.pixel_size_um), pixel_size_um))
        bands.append(
            calibrate_band(measured[-1], z_um, band_um, args.range_um or default_range_um, args.range_um is None)
        )
    chosen = best_band(bands)
    shown = chosen or bands[0]
    if args.plot is not None:
        _plot(
            args.plot,
            measured[bands.index(shown)],
            z_um,
            shown.range_um,
            f"calibrate-focus: {len(fields)} field(s), band {shown.band_um:.2f} um",
        )
    if len(bands) > 1 and chosen is not None:
        _print_bands(bands, chosen, optics_band_um, dither_um)
    for message in shown.skipped:
        print(f"skipped {message}")
    if chosen is None:
        raise InputError(f"{args.stack}: no field could be calibrated")

    width_um = chosen.width_um
    if not _WIDTH_RANGE_UM[0] <= width_um <= _WIDTH_RANGE_UM[1]:
        raise InputError(
            f"{args.stack}: the sharpness falls to exp(-1/2) over {width_um:.3g} um, which no microscope's focus "
            f"curve does ({_WIDTH_RANGE_UM[0]:g} to {_WIDTH_RANGE_UM[1]:g} um): check --z-step-um, the stage step "
            "between planes in um"
        )
    reference = "labelled focus" if labelled else "plane 0"
    print(
        f"{len(chosen.fields)} field(s), {len(z_um)} planes {abs(z_um[1] - z_um[0]):g} um apart, pixel "
        f"{pixel_size_um:.4g} um, band {chosen.band_um:.2f} um, planes within {chosen.range_um:.2f} um of the "
        "sharpest fitted"
    )
    print(f"{'field':<28} {'sharpest plane':>15} {'peak Z vs ' + reference:>25} {'width (um)':>11}")
    for r in chosen.fields:
        print(f"{r.name:<28} {r.sharpest_plane:>15d} {round(r.peak_z_um, 2) + 0.0:>+25.2f} {r.width_um:>11.2f}")
    half_extent_um = float(np.ptp(z_um)) / 2
    if half_extent_um < width_um:
        print(
            f"note: the stack spans +-{half_extent_um:.2f} um, less than the width it gives ({width_um:.2f} um), "
            f"which is extrapolated: planes over +-{2 * width_um:.1f} um would measure it"
        )
    band_setting = None if chosen.band_um == optics_band_um else round(chosen.band_um, 2)
    settings: dict[str, float | None] = {
        "sharpness_band_um": band_setting,
        "sharpness_width_um": float(_setting_um(width_um)),
        "sharpness_range_um": float(_setting_um(width_um)),
    }
    summary: dict[str, object] = {
        "width_um": round(width_um, 3),
        "sharpness_band_um": band_setting,
        "fields": [asdict(r) for r in chosen.fields],
        "skipped": chosen.skipped,
        "pixel_size_um": pixel_size_um,
        "range_um": chosen.range_um,
        "bands": [
            {
                "band_um": round(b.band_um, 4),
                "fields": len(b.fields),
                "range_um": round(b.range_um, 3),
                "width_um": round(b.width_um, 3) if b.fields else None,
                "noise_um2": round(b.noise_um2, 5) if b.fields else None,
            }
            for b in bands
        ],
    }
    print("\nfocus settings for these optics and this specimen (config file, section focus:):")
    print(
        "  sharpness_band_um: "
        + ("null    # the optics' resolution" if band_setting is None else f"{band_setting:g}")
        + f"\n  sharpness_width_um: {_setting_um(width_um)}\n  sharpness_range_um: {_setting_um(width_um)}"
    )
    depth_of_field_um = config.optics.depth_of_field_um
    if chosen.pair_noise_um(dither_um) > depth_of_field_um / 2:
        wanted_um = math.ceil(100 * chosen.noise_um2 / (math.sqrt(2) * depth_of_field_um / 2)) / 100
        largest_um = math.floor(100 * min(depth_of_field_um, width_um / 4, 5.0)) / 100
        capped = wanted_um > largest_um
        dither_setting = max(min(wanted_um, largest_um), 0.01)
        settings["sharpness_dither_um"] = summary["sharpness_dither_um"] = dither_setting
        print(
            f"  sharpness_dither_um: {dither_setting:g}    # single planes: two frames +-{dither_setting:g} um apart "
            f"put focus within {chosen.pair_noise_um(dither_setting):.2f} um (1 sd; at {dither_um:.2g} um: "
            f"{chosen.pair_noise_um(dither_um):.2f} um)"
            + (
                "; capped at the depth of field or a quarter of the width, still over half the depth of field: "
                "prefer z-stacks of 3+ planes per time point"
                if capped
                else "; z-stacks of 3+ planes do not dither"
            )
        )
    if labelled:
        shift_um = statistics.median(r.peak_z_um for r in chosen.fields)
        summary["sharpest_minus_focus_um"] = round(shift_um, 3)
        limit_um = width_um / 2
        note = "" if abs(shift_um) <= limit_um else f"; beyond +-{limit_um:.1f} um, half the range: not allowed"
        if not note:
            settings["target_offset_um"] = round(-shift_um, 1) + 0.0
        print(
            f"  target_offset_um: {round(-shift_um, 1) + 0.0:.1f}    # with fine_source sharpness: the sharpest "
            f"plane lies {round(shift_um, 2) + 0.0:+.2f} um from the labelled focus (+: deeper){note}"
        )
    peaks_um = [r.peak_z_um for r in chosen.fields]
    if labelled and len(peaks_um) >= 2 and max(peaks_um) - min(peaks_um) > depth_of_field_um:
        summary["sharpest_plane_spread_um"] = round(max(peaks_um) - min(peaks_um), 3)
        print(
            f"note: the sharpest plane lies {min(peaks_um):+.2f} to {max(peaks_um):+.2f} um from the labelled focus, "
            f"depending on the field: more than the depth of field ({depth_of_field_um:.2f} um), so no one "
            "target_offset_um holds your plane in every field; with z-stacks of 3+ planes, focus.hold: start keeps "
            "each position on the plane it starts at"
        )
    summary["settings"] = settings
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--json {args.json}: cannot write ({exc.strerror or exc})") from None
        print(f"wrote {args.json}")
    return 0
