"""What focus heads read on validation frames of their training envelope, side by side (never the OOD suite).

Why: choosing between focus heads by the OOD suite would tune the product on its test data. This compares heads on
the validation specimens that training and `calibrate-model` already use (seeds 2000+), each window its own camera,
family and optics variant drawn from the envelope, at |d| from 0 to 30 um with a sign drawn per frame; every model
reads the same frames. Per |d| it prints the 10th / 50th / 90th percentile and the maximum of the unsigned estimate,
then the shares that matter to `qc` (frames within 1 um of focus read beyond a threshold) and to the closed loop
(frames 6-10 um out read at or under it), and the mean absolute error within 10 um.

Run: python tools/head_readings.py --config tools/reports/robust-model/psnr-gain-loss/train-stage1-8k.yaml \
        --weights "shipped=acquire_refocus/model/weights/default.pt" --weights "candidate=W.pt" [--fields 32]
(about 1 min per model on one CPU thread, plus the rendering)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig, load_config
from acquire_refocus.engines.tiling import infer_frame
from acquire_refocus.model.data import calibration_windows
from acquire_refocus.model.normalization import frame_scale, normalize

MAGNITUDES_UM = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 20.0, 30.0)
QC_THRESHOLDS_UM = (4.0, 5.0, 6.0)


def readings(weights: Path, windows: list, magnitudes_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true |d|, read |d|) of every usable frame."""
    refocuser = Refocuser.load(weights, EngineConfig(backend="torch", precision="fp32", physics_fusion=False))
    true_um, read_um = [], []
    for window in windows:
        for raw, magnitude_um in zip(window.planes, magnitudes_um, strict=True):
            intensity = frame_scale(raw, refocuser.loaded.normalization)
            if intensity.is_degenerate:
                continue
            _, focus = infer_frame(refocuser.engine, normalize(raw, intensity))
            true_um.append(magnitude_um)
            read_um.append(focus.magnitude_um)
    return np.asarray(true_um), np.asarray(read_um)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the training config (its envelope)")
    parser.add_argument("--weights", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--fields", type=int, default=32, help="validation windows (256 px), default 32")
    args = parser.parse_args()
    config = load_config(args.config)
    magnitudes_um = np.asarray(MAGNITUDES_UM)
    windows = calibration_windows(config, args.fields, 256, list(MAGNITUDES_UM))
    print(f"{len(windows)} validation windows x {len(MAGNITUDES_UM)} distances, {args.config}")
    for spec in args.weights:
        name, _, path = spec.partition("=")
        true_um, read_um = readings(Path(path), windows, magnitudes_um)
        print(f"\n## {name} ({path}, {true_um.size} frames)")
        print("| |d| (um) | p10 | median | p90 | max |")
        print("|---|---|---|---|---|")
        for magnitude in MAGNITUDES_UM:
            read = read_um[true_um == magnitude]
            p10, p50, p90 = np.percentile(read, (10, 50, 90))
            print(f"| {magnitude:g} | {p10:.1f} | {p50:.1f} | {p90:.1f} | {read.max():.1f} |")
        near, mid = read_um[true_um <= 1.0], read_um[(true_um >= 6.0) & (true_um <= 10.0)]
        for threshold in QC_THRESHOLDS_UM:
            print(
                f"threshold {threshold:g} um: {np.mean(near > threshold):.1%} of {near.size} frames within 1 um read "
                f"beyond it; {np.mean(mid <= threshold):.1%} of {mid.size} frames at 6-10 um read at or under it"
            )
        within = true_um <= 10.0
        print(f"MAE within 10 um {np.mean(np.abs(read_um[within] - true_um[within])):.2f} um; ", end="")
        far = true_um >= 14.0
        print(f"median relative error beyond 14 um {np.median(np.abs(read_um[far] / true_um[far] - 1)):.0%}")


if __name__ == "__main__":
    main()
