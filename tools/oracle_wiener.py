"""How much a linear deconvolution could gain on the OOD suite's frames if it knew everything: Wiener with the model
optics' PSF at the TRUE |d| and, per set and distance, the balance that scores best ON THOSE TEST FRAMES.

Not a method (it reads the answer twice): a bound on what any Wiener path, the product's included, can reach with
a perfect distance estimate, to tell a target that needs a better |d| from one that needs a better prior (a
network). It changes nothing in the package and chooses nothing that ships.

Run: python tools/oracle_wiener.py [--config tools/reports/default-model/evaluate.yaml] [--fields 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus.config import load_config
from acquire_refocus.model.baselines import WIENER_BALANCES, deconvolve
from acquire_refocus.model.held_out import Sample, crop_psf
from acquire_refocus.model.ood import build_sets, ood_distances_um
from acquire_refocus.sim.microscope import SimulatedMicroscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tools/reports/default-model/evaluate.yaml")
    parser.add_argument("--fields", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    distances_um = ood_distances_um(config)
    sets = build_sets(config, args.fields, 256, distances_um, seed=config.training.seed)
    bank = SimulatedMicroscope(config.optics, config.simulator).psf_bank
    in_focus = crop_psf(bank.plane(int(bank.index(0.0))).astype(np.float64))
    print("PSNR gain over the raw frame (dB) of Wiener at the true |d| with the best balance per set and distance")
    print(f"{'set':<28}" + "".join(f"{d:>8g}" for d in distances_um))
    for set_name, samples in sets.items():
        gains: dict[float, list[list[float]]] = {}
        for sample in samples:
            magnitude_um = abs(sample.defocus_um)
            psf = crop_psf(bank.plane(int(bank.index(magnitude_um))).astype(np.float64))
            data_range = float(sample.truth.max() - sample.truth.min())
            raw_psnr = peak_signal_noise_ratio(sample.truth, sample.raw.astype(np.float32), data_range=data_range)
            offset = float(np.percentile(sample.raw, 0.5))
            frame = Sample("oracle", "oracle", 0.0, sample.raw, sample.raw)
            gains.setdefault(magnitude_um, []).append(
                [
                    float(peak_signal_noise_ratio(sample.truth, image, data_range=data_range)) - raw_psnr
                    for image in (
                        deconvolve(frame, psf, in_focus, offset, "wiener", balance) for balance in WIENER_BALANCES
                    )
                ]
            )
        best = {d: float(np.max(np.mean(rows, axis=0))) for d, rows in gains.items()}
        print(f"{set_name[:27]:<28}" + "".join(f"{best[d]:>+8.2f}" for d in sorted(best)), flush=True)


if __name__ == "__main__":
    main()
