"""`acquire-refocus simulate`: write simulated z-stacks with exactly known defocus, for training and evaluation."""

from __future__ import annotations

import argparse
import math
import re

from acquire_refocus.config import load_config
from acquire_refocus.errors import UserError

_DESCRIPTION = """\
Render z-stacks of Hoechst-stained nuclei on the simulated widefield microscope and save them like the
Broad BBBC006 benchmark: one folder per focal plane (z00/, z01/, ...) with one 16-bit TIFF per field of view,
plus ground_truth/ (the noiseless in-focus image of each field, float32) and dataset.json (every parameter,
so the same seed regenerates the same data).

The optics, camera and specimen come from --config (default: the built-in simulated microscope, a 20x/0.45
air objective). Defocus is stage Z minus in-focus Z: positive planes lie deeper into the sample, further
from the coverslip. Read the result back with 'acquire-refocus train' (training.data: stored) or evaluate.
"""

_EPILOG = """\
examples:
  acquire-refocus simulate --out data/sim --fields 16 --defocus-um -34:34:2
  acquire-refocus simulate --config configs/simulator.yaml --out data/small --fields 4 --defocus-um=-10,-5,0,5,10
"""

_RANGE = re.compile(r"^\s*([-+]?[\d.]+)\s*:\s*([-+]?[\d.]+)\s*:\s*([-+]?[\d.]+)\s*$")
_MAX_PLANES = 1000


def parse_defocus(text: str) -> list[float]:
    """'-34:34:2' (start:stop:step, stop included when on the grid) or '-4,-2,0,2,4' -> list of um."""
    match = _RANGE.match(text)
    if match:
        try:
            start, stop, step = (float(g) for g in match.groups())
        except ValueError:
            raise UserError(f"--defocus-um: cannot read {text!r} as start:stop:step") from None
        if step <= 0 or stop < start:
            raise UserError(f"--defocus-um: {text!r} needs start <= stop and a positive step, e.g. -34:34:2")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > _MAX_PLANES:
            raise UserError(f"--defocus-um: {text!r} gives {count} planes; at most {_MAX_PLANES}")
        return [round(start + i * step, 6) for i in range(count)]
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--defocus-um: cannot read {text!r}; give start:stop:step (-34:34:2) or a comma list (-4,0,4)"
        ) from None
    if not values:
        raise UserError("--defocus-um: give at least one plane")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # Let values such as "-34:34:2" and "-4,0,4" follow --defocus-um without '=' (argparse would otherwise take
    # anything starting with '-' for an option; this parser has no options that look like numbers).
    parser._negative_number_matcher = re.compile(r"^-[\d.]+(?:[:,][-+\d.:,]*)?$")  # noqa: SLF001 - argparse's only hook for it
    parser.add_argument("--config", metavar="FILE", help="YAML config (optics:, simulator:); default: built-in")
    parser.add_argument("--out", metavar="DIR", required=True, help="new or empty folder to write the dataset into")
    parser.add_argument("--fields", metavar="N", type=int, default=8, help="fields of view (default: 8)")
    parser.add_argument(
        "--defocus-um",
        metavar="PLANES",
        default="-34:34:2",
        help="planes in um from focus: start:stop:step or a comma list (default: -34:34:2: 35 planes 2 um apart, "
        "the step and range of BBBC006); all within +/- simulator.max_defocus_um",
    )
    parser.add_argument("--seed", metavar="S", type=int, default=0, help="random seed: fields, noise (default: 0)")


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.sim.dataset import write_simulated_dataset

    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    config = load_config(args.config)
    defocus_um = parse_defocus(args.defocus_um)
    written = write_simulated_dataset(
        args.out, config.optics, config.simulator, fields=args.fields, defocus_um=defocus_um, seed=args.seed
    )
    height_px, width_px = written.frame_shape_px
    in_focus = "none (no 0 um plane)" if written.in_focus_index is None else f"plane {written.in_focus_index}"
    print(
        f"wrote {written.root}\n"
        f"  {written.fields} fields x {len(written.defocus_um)} planes, {width_px}x{height_px} px, "
        f"pixel size {written.pixel_size_um:.4g} um\n"
        f"  defocus {written.defocus_um[0]:g} .. {written.defocus_um[-1]:g} um, in focus: {in_focus}\n"
        f"  {written.bytes_written / 1e6:.1f} MB in {written.seconds:.1f} s (seed {args.seed}); "
        f"parameters in {written.root / 'dataset.json'}"
    )
    return 0
