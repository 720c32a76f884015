"""The physics path on against off, frame by frame, on the simulator's nuclei across brightness.

A development check beside the OOD suite (model README, "The physics path, shipped"): it found the far-bin losses
that shaped the calibration's rules. The default simulator specimen (its own seed, not a training, validation or
OOD seed), two stage positions, Poisson frames at 50 / 1,000 / 5,000 photons peak, |d| from 0 to 30 um, both signs,
one noise draw each; each frame refocused by the same weights with `engine.physics_path` on and off (ONNX Runtime),
scored by PSNR against the noiseless in-focus image. Prints the frames where "on" is more than 0.5 dB below "off"
or 0.3 dB below the raw frame, and the mean and worst difference per |d|.

Run: python tools/sweep_physics_path.py [--weights W]   (about 2 min on one CPU thread)
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig, parse_config
from acquire_refocus.sim.microscope import SimulatedMicroscope

MAGNITUDES_UM = (0, 1, 2, 3, 5, 7, 9, 12, 15, 20, 25, 30)
STAGE_POSITIONS_UM = ((0.0, 0.0), (37.0, -52.0))
PEAKS_PHOTONS = (50, 1000, 5000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="weights (default: the shipped model)")
    args = parser.parse_args()
    config = parse_config({})
    scope = SimulatedMicroscope(config.optics, config.simulator)
    on = Refocuser.load(args.weights, EngineConfig(backend="onnxruntime"))
    off = Refocuser.load(args.weights, EngineConfig(backend="onnxruntime", physics_path=False))
    if on.physics_path is None:
        raise SystemExit("these weights carry no physics-path calibration: run acquire-refocus calibrate-model")
    print("shares per bin:", on.physics_path.calibration.shares)
    defocus = sorted({sign * m for m in MAGNITUDES_UM for sign in (-1.0, 1.0)})
    by_distance: dict[float, list[tuple[float, float]]] = collections.defaultdict(list)
    for field, position in enumerate(STAGE_POSITIONS_UM):
        stack, truth = scope.photon_stack(defocus, position, (256, 256))
        for peak in PEAKS_PHOTONS:
            scale = peak / float(truth.max())
            target = truth * scale
            data_range = float(target.max() - target.min())
            rng = np.random.default_rng([field, peak])
            for d, photons in zip(defocus, stack, strict=True):
                frame = rng.poisson(photons * scale).astype(np.float32)
                with_path, without, raw = (
                    float(peak_signal_noise_ratio(target, image.astype(np.float64), data_range=data_range))
                    for image in (on(frame).image, off(frame).image, frame)
                )
                by_distance[abs(d)].append((with_path - without, with_path - raw))
                if with_path < without - 0.5 or with_path < raw - 0.3:
                    print(
                        f"  field {field} peak {peak} d {d:+g} um: on {with_path:.2f}, off {without:.2f}, "
                        f"raw {raw:.2f} dB"
                    )
    every = np.array([pair for pairs in by_distance.values() for pair in pairs])
    print(
        f"{len(every)} frames: {int((every[:, 0] < -0.5).sum())} more than 0.5 dB below the path off "
        f"(worst {every[:, 0].min():+.2f} dB), {int((every[:, 1] < -0.3).sum())} more than 0.3 dB below raw"
    )
    for d in sorted(by_distance):
        values = np.array(by_distance[d])
        print(
            f"|d| {d:4g} um: on - off mean {values[:, 0].mean():+.2f} dB, worst {values[:, 0].min():+.2f}; "
            f"on - raw mean {values[:, 1].mean():+.2f}"
        )


if __name__ == "__main__":
    main()
