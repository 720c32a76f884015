"""How a model's gain and |d| reading depend on the size of the nuclei it sees.

Why: a model trained on one nucleus size can read a larger, smoother nucleus in focus as a smaller one blurred,
and "refocus" it into bright blobs. The shipped model before 2026-12-07 late trained on the simulator's 7-14 um
nuclei only; this probe found it 17-23 dB worse than the raw frame on nuclei twice that size within 6 um of focus.

Nuclei are drawn exactly as training's `nucleus_size_factor` draws them (`sim/randomization.specimen_simulator`:
diameter and thickness scaled, coverage kept), from specimen seeds 3700+ (training uses 1000+, validation 2000+,
the OOD suite 3000-3699), imaged at the OOD suite's realistic brightness (200-2,000 photons peak), both signs of
each distance, through the Refocuser with its fusion as the daemon runs it.

    python tools/nucleus_size_probe.py --weights acquire_refocus/model/weights/default.pt --sizes 0.5 1 2 2.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from acquire_refocus.config import AppConfig, EngineConfig, RandomizationConfig
from acquire_refocus.model.data import TEST_SEED_BASE
from acquire_refocus.model.held_out import Sample
from acquire_refocus.model.ood import (
    busy_positions,
    evaluate_sets,
    grid_positions,
    per_distance,
    realistic_camera,
    render_set,
)
from acquire_refocus.refocuser import Refocuser
from acquire_refocus.sim.microscope import SimulatedMicroscope
from acquire_refocus.sim.randomization import SpecimenDraw, specimen_simulator

PROBE_SEED_BASE = TEST_SEED_BASE + 700


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, action="append", help="weights to probe (repeat; default: shipped)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1.0, 2.0, 2.5], help="nucleus size factors")
    parser.add_argument("--distances-um", type=float, nargs="+", default=[0.0, 3.0, 6.0, 10.0, 20.0])
    parser.add_argument("--fields", type=int, default=3, help="windows per size")
    parser.add_argument("--window-px", type=int, default=128)
    args = parser.parse_args(argv)
    config = AppConfig()
    envelope = RandomizationConfig(nucleus_size_factor=(min(args.sizes), max(args.sizes)))
    engine = EngineConfig(backend="torch", precision="fp32", num_threads=1)
    for weights in args.weights or [None]:
        refocuser = Refocuser.load(weights, engine)

        def refocus(sample: Sample, refocuser: Refocuser = refocuser) -> tuple[np.ndarray, float, float]:
            result = refocuser(sample.raw)
            return result.image, result.defocus_magnitude_um, result.confidence

        print(f"\n{weights or 'shipped model'}: PSNR gain over the raw frame (dB) / mean |d| read (um)")
        print("size x | " + " | ".join(f"{d:g} um" for d in args.distances_um))
        for index, size in enumerate(args.sizes):
            seed = PROBE_SEED_BASE + index
            draw = SpecimenDraw("nuclei", 1.0, 6.0, 0, size)
            simulator = specimen_simulator(envelope, config.simulator, draw, seed)
            scope = SimulatedMicroscope(config.optics, simulator)
            side_um = (envelope.field_size_um, envelope.field_size_um)
            positions = busy_positions(scope, grid_positions(side_um, 3), args.fields, args.window_px)
            rng = np.random.default_rng(seed)
            samples = render_set(scope, "probe", positions, args.distances_um, args.window_px, realistic_camera, rng)
            rows = evaluate_sets({"probe": samples}, {"model": refocus})
            table = per_distance(rows, "model", "probe")
            cells = [f"{cell['gain_db']:+.2f} / {cell['magnitude_um']:.1f}" for cell in table.values()]
            print(f"{size:g} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
