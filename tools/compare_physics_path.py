"""The physics-informed path through the shipped fusion, side by side with the network, on the OOD suite's frames.

`evaluate --suite ood` scores "Wiener at |d|" raw: Wiener deconvolution with the model optics' PSF at the
network's unsigned estimate, balance tuned per distance on a validation specimen, re-blurred to the in-focus
image. Near focus on bright frames that over-sharpens (the head reads ~2 um in focus). This script passes the same
Wiener image through the model's OpticalFusion, exactly as the Refocuser passes the network's (the amplitude bound
at |d| less the margin, then the blend with the raw frame, the noise probe run through the Wiener filter), and
prints, per set and |d|, the PSNR gain of: the network through the fusion (what ships), Wiener through the fusion,
and their mean: the two candidates of the product's physics path (model/physics_path.py) on their own, where the
OOD suite scores only their calibrated mixture. Useful to see, for a new model, which path wins at which distance
on data the calibration never saw; it changes nothing in the package.

Run: python tools/compare_physics_path.py [--config tools/reports/default-model/evaluate.yaml] [--weights W]
     [--fields 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus.config import load_config
from acquire_refocus.engines.tiling import infer_frame
from acquire_refocus.model.normalization import denormalize, frame_scale, normalize
from acquire_refocus.model.ood import build_sets, ood_distances_um, wiener_at_magnitude
from acquire_refocus.refocuser import Refocuser

METHODS = ("network + fusion", "Wiener + fusion", "mean of both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tools/reports/default-model/evaluate.yaml")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--fields", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    distances_um = ood_distances_um(config)
    sets = build_sets(config, args.fields, 256, distances_um, seed=config.training.seed)
    refocuser = Refocuser.load(args.weights, "onnxruntime")
    fusion = refocuser.fusion
    if fusion is None:
        raise SystemExit("the engine config has physics_fusion off: nothing to compare")
    wiener_at = wiener_at_magnitude(config, 256, distances_um)

    def network(window: np.ndarray) -> np.ndarray:
        return infer_frame(refocuser.engine, window)[0]

    print(" / ".join(METHODS), "(PSNR gain over the raw frame, dB, mean of both signs and all fields)")
    for set_name, samples in sets.items():
        gains: dict[float, list[list[float]]] = {}
        for sample in samples:
            intensity = frame_scale(sample.raw, refocuser.loaded.normalization)
            frame = normalize(sample.raw, intensity)
            image, focus = infer_frame(refocuser.engine, frame)
            magnitude_um = focus.magnitude_um
            wiener = wiener_at(magnitude_um)
            by_network = fusion(frame, image, magnitude_um, network)
            by_wiener = fusion(frame, wiener(frame), magnitude_um, wiener)
            data_range = float(sample.truth.max() - sample.truth.min())
            raw_psnr = peak_signal_noise_ratio(sample.truth, sample.raw.astype(np.float32), data_range=data_range)
            outputs = (by_network, by_wiener, 0.5 * (by_network + by_wiener))
            gains.setdefault(abs(sample.defocus_um), []).append(
                [
                    float(peak_signal_noise_ratio(sample.truth, denormalize(o, intensity), data_range=data_range))
                    - raw_psnr
                    for o in outputs
                ]
            )
        cells = [f"{d:g}:" + "/".join(f"{g:+.2f}" for g in np.mean(rows, axis=0)) for d, rows in sorted(gains.items())]
        print(f"{set_name[:24]:24}", " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
