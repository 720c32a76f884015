"""How much does one frame say about the sign of defocus, for given optics? Two measurements on simulated frames.

1. Known-specimen bound: with the specimen known exactly (the simulator's own), is a noisy frame at defocus d more
   likely under the expected image at +|d| or at -|d|? (Gaussian approximation of the camera's Poisson + read
   noise.) This is the most any method could do; a network never knows the specimen.
2. Blind second-order statistics: a small classifier on the frame's radially averaged log power spectrum (what a
   PSF's blur does to a random specimen's statistics), trained on specimens 1000+ and tested on 3000+.

If (2) stays near 50 % while (1) is near 100 %, the frames' above/below difference lies in where this particular
specimen's structures are, not in a specimen-independent blur signature a single-frame network could learn.
Run: python tools/sign_information.py [--config my.yaml] [--train-fields 128] [--test-fields 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus.config import AppConfig, load_config
from acquire_refocus.model.data import TEST_SEED_BASE, TRAIN_SEED_BASE, MicroscopeCache, simulated_fields

MAGNITUDES_UM = (2.0, 5.0, 10.0, 20.0, 30.0)
WINDOW_PX = 256


def _frames(
    config: AppConfig, cache: MicroscopeCache, seed_base: int, fields: int, planes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy frames at random signed defocus (|d| from 3 to 35 um) and their defocus."""
    frames, defocus = [], []
    for field in simulated_fields(fields, seed_base, config.simulator.specimen.field_size_um):
        scope = cache.get(field.seed)
        d = rng.uniform(3.0, 35.0, planes) * rng.choice([-1.0, 1.0], planes)
        stack, _ = scope.render_stack(list(d), (field.x_um, field.y_um), rng=rng, shape_px=(WINDOW_PX, WINDOW_PX))
        frames.append(stack.astype(np.float64))
        defocus.append(d)
    return np.concatenate(frames), np.concatenate(defocus)


def known_specimen_accuracy(
    config: AppConfig, cache: MicroscopeCache, fields: int, rng: np.random.Generator
) -> dict[str, float]:
    """Sign accuracy per |d| of the likelihood-ratio test that knows the specimen; fields without cells skipped."""
    camera = config.simulator.camera
    read_var = (camera.gain_adu_per_electron * camera.read_noise_electrons) ** 2
    result: dict[str, float] = {}
    candidates = simulated_fields(fields, TEST_SEED_BASE, config.simulator.specimen.field_size_um)
    for magnitude in MAGNITUDES_UM:
        correct, counted = 0, 0
        for field in candidates:
            scope = cache.get(field.seed)
            xy = (field.x_um, field.y_um)
            sign = float(rng.choice([-1.0, 1.0]))
            frame, _ = scope.render_stack([sign * magnitude], xy, rng=rng, shape_px=(WINDOW_PX, WINDOW_PX))
            means, _ = scope.render_stack([magnitude, -magnitude], xy, noise=False, shape_px=(WINDOW_PX, WINDOW_PX))
            if np.array_equal(means[0], means[1]):
                continue  # no cells in view: nothing to tell
            x = frame[0].astype(np.float64)
            log_likelihood = []
            for mean in means.astype(np.float64):
                variance = camera.gain_adu_per_electron * np.maximum(mean - camera.offset_adu, 0.0) + read_var
                log_likelihood.append(-0.5 * float(np.sum((x - mean) ** 2 / variance + np.log(variance))))
            correct += (log_likelihood[0] > log_likelihood[1]) == (sign > 0)
            counted += 1
        result[f"{magnitude:g}"] = correct / max(1, counted)
    return result


def radial_log_spectrum(frames: np.ndarray) -> np.ndarray:
    """Radially averaged log power spectrum per frame (Hann window, offset removed), relative to its lowest band,
    so brightness and exposure drop out."""
    count, height, width = frames.shape
    frames = frames - np.percentile(frames.reshape(count, -1), 1, axis=1)[:, None, None]
    window = np.outer(np.hanning(height), np.hanning(width))
    power = np.abs(np.fft.fft2(frames * window)) ** 2
    radius = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :])
    edges = np.unique(np.round(np.geomspace(1.5, height / 2, 40) * 2) / 2) / height
    bands = [(radius >= low) & (radius < high) for low, high in itertools.pairwise(edges)]
    features = np.stack([np.log(power[:, band].mean(axis=1) + 1e-9) for band in bands if band.sum() >= 4], axis=1)
    return features - features[:, :1]


def blind_spectrum_accuracy(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], steps: int = 3000
) -> dict[str, float]:
    """Sign accuracy (train and held-out test) of a small MLP on the radial log power spectrum."""
    torch.manual_seed(0)
    x_train, x_test = radial_log_spectrum(train[0]), radial_log_spectrum(test[0])
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-9
    inputs = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    held_out = torch.tensor((x_test - mean) / std, dtype=torch.float32)
    labels = torch.tensor(train[1] > 0, dtype=torch.float32)[:, None]
    classifier = torch.nn.Sequential(
        torch.nn.Linear(inputs.shape[1], 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
    )
    optimizer = torch.optim.Adam(classifier.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (256,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_right = ((classifier(inputs)[:, 0] > 0).numpy() == (train[1] > 0)).mean()
        test_right = ((classifier(held_out)[:, 0] > 0).numpy() == (test[1] > 0)).mean()
    return {"train": float(train_right), "test": float(test_right), "test_frames": len(test[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML config (optics, simulator sections)")
    parser.add_argument("--train-fields", type=int, default=128)
    parser.add_argument("--test-fields", type=int, default=32)
    parser.add_argument("--planes", type=int, default=16, help="frames per field for the blind classifier")
    args = parser.parse_args()
    config = load_config(args.config)
    cache = MicroscopeCache(config.optics, config.simulator)
    rng = np.random.default_rng(7)
    train = _frames(config, cache, TRAIN_SEED_BASE, args.train_fields, args.planes, rng)
    test = _frames(config, cache, TEST_SEED_BASE, args.test_fields, args.planes, rng)
    report = {
        "optics": config.optics.model_dump(mode="json"),
        "known_specimen_sign_accuracy_by_abs_defocus_um": known_specimen_accuracy(config, cache, args.test_fields, rng),
        "blind_spectrum_sign_accuracy": blind_spectrum_accuracy(train, test),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
