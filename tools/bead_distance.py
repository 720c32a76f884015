"""Does one frame of a thin specimen say how far focus is? A physics fit on bead frames, beside the network's head.

Every specimen family the networks train on spreads over um in z, and their autofocus heads read a near-constant
|d| near focus. A bead slide is the exception: sub-resolution beads in one plane are point sources, so a frame's
radially averaged power spectrum is the PSF's |OTF(d)|^2 times a known, nearly flat bead spectrum, times the bead
count, plus white noise. This script fits that shape to each plane of the model optics' PSF bank (free scale, log
residuals over the bands that stand above the noise, the noise floor read in the corner band beyond Nyquist) and
reports the |d| of the best plane per frame, beside the head's `defocus_magnitude_um`.

Frames: the out-of-distribution suite's bead set (`--psf vectorial`, the simulator's PSF, the same as the bank's:
an upper bound) or the same beads through psfmodels' scalar Gibson-Lanni PSF (`--psf scalar`, a PSF model the fit
does not know). The fit's bank: the fusion's (`--bank fusion`: at the coverslip, d >= 0, what the package has at
run time) or the bead slide's own (`--bank beads`: at the beads' depth in the medium, both signs).
Run: python tools/bead_distance.py [--config my.yaml] [--weights my.pt | --no-head] [--psf scalar] [--bank beads]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import scipy.fft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus.config import AppConfig, load_config
from acquire_refocus.model.fusion import OpticalFusion, bank_mtf
from acquire_refocus.model.held_out import Sample
from acquire_refocus.model.ood import BEAD_SEED_BASE, build_sets, ood_distances_um, select_sets, suite_simulator
from acquire_refocus.sim.microscope import SimulatedMicroscope
from acquire_refocus.sim.psf import PsfBank

WINDOW_PX = 256
BANDS = 64  # radial bands up to Nyquist; band BANDS holds the corners beyond it (noise)
BEAD_SIGMA_UM = 0.05  # the bead family's own radius (sim/families.py)
SIGNIFICANCE = 4.0  # a band counts when its signal stands this many standard errors above the noise floor


def _bands(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    radius = np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :])
    band = np.minimum((radius / 0.5 * BANDS).astype(np.int64), BANDS)
    band[0, :] = band[:, 0] = -1  # the axes carry column and row patterns, not the PSF
    return band, radius


def _profile(power: np.ndarray, band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = band >= 0
    counts = np.bincount(band[keep], minlength=BANDS + 1)
    return np.bincount(band[keep], power[keep], minlength=BANDS + 1) / np.maximum(counts, 1), counts


class BeadDistanceFit:
    """|d| of a bead frame: the bank plane whose |OTF|^2 x bead spectrum best fits the frame's power spectrum.

    `bank`: the planes to fit, signed defocus (um) -> PSF (sim/psf.py PsfBank). The fusion's bank (the default)
    is computed at the coverslip for d >= 0 only; the simulator's bank for the bead slide is computed at the
    beads' depth in the medium, both signs, which at high NA into water differ (spherical aberration)."""

    def __init__(self, config: AppConfig, shape: tuple[int, int], bank: PsfBank, signed: bool) -> None:
        reach_um = max(abs(float(d)) for d in config.training.defocus_range_um)
        self.band, radius = _bands(shape)
        sigma_px = BEAD_SIGMA_UM / config.optics.pixel_size_um
        bead_power = np.exp(-2.0 * math.pi**2 * sigma_px**2 * radius**2) ** 2
        planes = [
            index for index, d in enumerate(bank.defocus_um) if abs(d) <= reach_um * 1.2 + 1e-9 and (signed or d >= 0)
        ]
        self.distances_um = np.abs(np.asarray(bank.defocus_um, dtype=np.float64)[planes])
        self.models = np.array(
            [
                _profile(bank_mtf(bank, index, shape).astype(np.float64) ** 2 * bead_power, self.band)[0]
                for index in planes
            ]
        )

    def __call__(self, frame: np.ndarray) -> float:
        values = frame.astype(np.float64)
        power, counts = _profile(np.abs(scipy.fft.rfft2(values - values.mean())) ** 2, self.band)
        floor = power[BANDS]
        signal = power[1:BANDS] - floor
        used = signal > SIGNIFICANCE * floor / np.sqrt(np.maximum(counts[1:BANDS], 1))
        if used.sum() < 3:
            return math.nan
        residuals = np.log(signal[used])[None, :] - np.log(np.maximum(self.models[:, 1:BANDS][:, used], 1e-30))
        return float(self.distances_um[int(np.argmin(residuals.var(axis=1)))])


def _bead_frames(config: AppConfig, fields: int, psf: str) -> list[Sample]:
    """The suite's bead set; with psf 'scalar' the same beads, cameras and noise draws through psfmodels' scalar
    PSF (the whole suite is built through it, and its bead set taken)."""
    simulator = config.simulator.model_copy(update={"psf_model": psf})
    frames_config = config.model_copy(update={"simulator": simulator})
    sets = build_sets(frames_config, fields, WINDOW_PX, ood_distances_um(config), seed=config.training.seed)
    return select_sets(sets, ["beads"])["beads (one plane)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="optics (default: the shipped model's)")
    parser.add_argument(
        "--weights", type=Path, default=None, help="the network whose head to compare (default shipped)"
    )
    parser.add_argument("--fields", type=int, default=3)
    parser.add_argument("--psf", choices=("vectorial", "scalar"), default="vectorial")
    parser.add_argument(
        "--bank",
        choices=("fusion", "beads"),
        default="fusion",
        help="fit against the fusion's bank (at the coverslip, d >= 0; default) or the bead slide's own (at the "
        "beads' depth, both signs; with --psf vectorial the very PSF that made the frames)",
    )
    parser.add_argument("--no-head", action="store_true", help="fit only (no network for these optics at hand)")
    args = parser.parse_args()
    from acquire_refocus.refocuser import Refocuser

    config = load_config(args.config)
    samples = _bead_frames(config, args.fields, args.psf)
    reach_um = max(abs(float(d)) for d in config.training.defocus_range_um)
    if args.bank == "beads":
        scope = SimulatedMicroscope(
            config.optics,
            suite_simulator(config.simulator, family="beads", field_size_um=(200.0, 200.0)).model_copy(
                update={"seed": BEAD_SEED_BASE}
            ),
        )
        bank = scope.psf_bank
    else:
        bank = OpticalFusion(config.optics, 0.0, reach_um).bank
    fit = BeadDistanceFit(config, (WINDOW_PX, WINDOW_PX), bank, signed=args.bank == "beads")
    head = None if args.no_head else Refocuser.load(args.weights, "onnxruntime")
    rows: dict[float, list[tuple[float, float]]] = {}
    for sample in samples:
        read = math.nan if head is None else head(sample.raw).defocus_magnitude_um
        rows.setdefault(abs(sample.defocus_um), []).append((fit(sample.raw), read))
    print(
        f"beads ({args.psf} PSF), {config.optics.magnification:g}x / {config.optics.numerical_aperture:g} NA, "
        f"{args.bank} bank, planes {np.diff(bank.defocus_um[:2])[0]:.2f} um apart; mean |d| read and mean "
        "absolute error (um)"
    )
    print("| |d| | spectral fit | its error | head | its error |")
    print("|---|---|---|---|---|")
    for distance, pairs in sorted(rows.items()):
        fitted, read = (np.array(column) for column in zip(*pairs, strict=True))
        print(
            f"| {distance:g} | {np.nanmean(fitted):.2f} | {np.nanmean(np.abs(fitted - distance)):.2f} | "
            f"{read.mean():.2f} | {np.abs(read - distance).mean():.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
