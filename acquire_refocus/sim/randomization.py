"""Domain randomisation for training data: draw a camera, a specimen and optics within an envelope.

The network must refocus frames from cameras, samples and objectives it never saw. The simulator's own defaults
(peak ~60-160 photons, one nucleus specimen, one PSF) taught the previous default to denoise one noise level and
reshape one texture, which made real, brighter frames worse near focus. Here every training window draws:

- a camera (`CameraDraw`): peak signal log-uniform over `peak_photons`, background as a fraction of the peak, read
  noise, gain, offset, hot pixels and per-column fixed-pattern offsets; the ground truth stays the noiseless
  in-focus response of the same camera (no hot pixels, no fixed pattern: those are defects to remove);
- per specimen seed: a family, a density, a layer thickness, a nucleus size and one of a few optics variants around
  the config's optics (NA, wavelength, correction-collar mismatch, pixel size), each with its own cached PSF bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from acquire_refocus.config import CameraConfig, OpticsConfig, RandomizationConfig, SimulatorConfig
from acquire_refocus.sim.camera import Camera

# The families whose specimens are (or include) nuclei: the ones `nucleus_size_factor` scales.
NUCLEUS_FAMILIES = ("nuclei", "mixture")
# The percentile of the in-focus image that the drawn peak signal is assigned to (robust to a few hot voxels).
PEAK_PERCENTILE = 99.9


@dataclass(frozen=True)
class CameraDraw:
    """One camera and illumination setting for a training window."""

    peak_photons: float
    background_fraction: float
    read_noise_electrons: float
    gain_adu_per_electron: float
    offset_adu: float
    hot_pixel_fraction: float
    fixed_pattern_adu: float

    def camera_config(self, base: CameraConfig) -> CameraConfig:
        return base.model_copy(
            update={
                "read_noise_electrons": self.read_noise_electrons,
                "gain_adu_per_electron": self.gain_adu_per_electron,
                "offset_adu": self.offset_adu,
            }
        )


def _uniform(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return float(rng.uniform(pair[0], pair[1])) if pair[1] > pair[0] else float(pair[0])


def _log_uniform(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    # clipped: exp(log(x)) can land an ulp outside a range whose ends are equal
    return float(min(max(math.exp(_uniform(rng, (math.log(pair[0]), math.log(pair[1])))), pair[0]), pair[1]))


def draw_camera(envelope: RandomizationConfig, rng: np.random.Generator) -> CameraDraw:
    return CameraDraw(
        peak_photons=_log_uniform(rng, envelope.peak_photons),
        background_fraction=_uniform(rng, envelope.background_fraction),
        read_noise_electrons=_uniform(rng, envelope.read_noise_electrons),
        gain_adu_per_electron=_log_uniform(rng, envelope.gain_adu_per_electron),
        offset_adu=_uniform(rng, envelope.offset_adu),
        hot_pixel_fraction=_uniform(rng, envelope.hot_pixel_fraction),
        fixed_pattern_adu=_uniform(rng, envelope.fixed_pattern_adu),
    )


def expose_window(
    photons: np.ndarray, truth_photons: np.ndarray, draw: CameraDraw, base: CameraConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy uint16 frames [Z, H, W] and the noiseless in-focus response (float32 ADU) for signal-only photons.

    The photons are scaled so the in-focus image's PEAK_PERCENTILE is `draw.peak_photons`; a uniform background of
    `background_fraction` of the peak is added to frames and truth alike."""
    reference = float(np.percentile(truth_photons, PEAK_PERCENTILE))
    scale = np.float32(draw.peak_photons / max(reference, 1e-6))
    background = np.float32(draw.background_fraction * draw.peak_photons)
    camera = Camera(draw.camera_config(base))
    height, width = truth_photons.shape
    hot = rng.random((height, width)) < draw.hot_pixel_fraction
    hot_photons = np.asarray(
        np.where(hot, rng.uniform(0.2, 3.0, (height, width)) * draw.peak_photons, 0.0), dtype=np.float32
    )
    columns = np.asarray(rng.standard_normal(int(width)) * draw.fixed_pattern_adu, dtype=np.float32)
    frames = np.empty(photons.shape, dtype=np.uint16)
    for index, plane in enumerate(photons):
        counts = camera.expose(plane * scale + background + hot_photons, rng).astype(np.float32) + columns
        frames[index] = np.clip(np.rint(counts), 0, camera.max_adu).astype(np.uint16)
    truth = camera.expected_adu(truth_photons * scale + background)
    return frames, truth


def optics_variants(envelope: RandomizationConfig, optics: OpticsConfig, seed: int) -> list[OpticsConfig]:
    """The config's optics, then `envelope.optics_variants` drawn around it (deterministic for a seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0971C5]))
    variants = [optics]
    for _ in range(envelope.optics_variants):
        na = optics.numerical_aperture + rng.uniform(-1, 1) * envelope.numerical_aperture_jitter
        na = float(min(max(na, 0.05), 0.95 * optics.immersion_index))
        variants.append(
            optics.model_copy(
                update={
                    "numerical_aperture": round(na, 3),
                    "emission_wavelength_nm": round(
                        float(
                            optics.emission_wavelength_nm + rng.uniform(-1, 1) * envelope.emission_wavelength_jitter_nm
                        ),
                        1,
                    ),
                    "coverslip_thickness_um": round(
                        float(optics.collar_thickness_um + _uniform(rng, envelope.collar_mismatch_um)), 1
                    ),
                    "magnification": round(
                        float(optics.magnification / (1.0 + rng.uniform(-1, 1) * envelope.pixel_size_jitter)), 3
                    ),
                }
            )
        )
    return variants


@dataclass(frozen=True)
class SpecimenDraw:
    """What one training specimen seed is: its family, density, thickness, nucleus size and optics variant."""

    family: str
    density_factor: float
    layer_thickness_um: float
    optics_index: int
    nucleus_size_factor: float


def draw_specimen(envelope: RandomizationConfig, seed: int) -> SpecimenDraw:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5BEC]))
    return SpecimenDraw(
        family=str(rng.choice(list(envelope.families))),
        density_factor=_log_uniform(rng, envelope.density_factor),
        layer_thickness_um=float(rng.choice(list(envelope.layer_thickness_um))),
        optics_index=int(rng.integers(envelope.optics_variants + 1)),
        # drawn last, so that envelopes without a size range draw every other axis as before
        nucleus_size_factor=_log_uniform(rng, envelope.nucleus_size_factor),
    )


def specimen_simulator(
    envelope: RandomizationConfig, simulator: SimulatorConfig, draw: SpecimenDraw, seed: int
) -> SimulatorConfig:
    """The simulator section for one drawn specimen: its seed, family, density, thickness and nucleus size, a field
    of `envelope.field_size_um`, no background (the camera draw adds it), no drift or tilt."""
    base = simulator.specimen
    # only nuclei take the size; the other families read nuclei_per_mm2 as their density scale and the nuclei's
    # thickness as their depth, so they are left as drawn (in a mixture the other family's count follows the
    # nuclei's, which come from the same density)
    size = draw.nucleus_size_factor if draw.family in NUCLEUS_FAMILIES else 1.0
    per_mm2 = base.nuclei_per_mm2 * draw.density_factor / size**2  # the same coverage at any nucleus size
    specimen = base.model_copy(
        update={
            "family": draw.family,
            "nuclei_per_mm2": min(20_000.0, per_mm2),
            "nucleus_diameter_um": (base.nucleus_diameter_um[0] * size, base.nucleus_diameter_um[1] * size),
            "nucleus_thickness_um": (base.nucleus_thickness_um[0] * size, base.nucleus_thickness_um[1] * size),
            "layer_thickness_um": draw.layer_thickness_um,
            "field_size_um": (envelope.field_size_um, envelope.field_size_um),
            "background_photons_per_px": 0.0,
        }
    )
    drift = simulator.drift.model_copy(update={"model": "none", "tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0})
    return simulator.model_copy(update={"seed": seed, "specimen": specimen, "drift": drift})
