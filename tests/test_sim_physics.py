"""Physics of the simulated microscope: focus, above/below asymmetry, camera noise, drift, tilt, seeds, PSF cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from acquire_refocus.config import (
    CameraConfig,
    DriftConfig,
    OpticsConfig,
    SimulatorConfig,
    SpecimenConfig,
)
from acquire_refocus.sim.camera import Camera, exact_below_electrons
from acquire_refocus.sim.drift import Drift
from acquire_refocus.sim.microscope import SimulatedMicroscope

SHAPE = (128, 128)


def _simulator(cache_dir, **changes) -> SimulatorConfig:
    base = {
        "camera": CameraConfig(width_px=128, height_px=128),
        # dense, bright field so every small window holds nuclei
        "specimen": SpecimenConfig(field_size_um=(120.0, 120.0), nuclei_per_mm2=4000.0, photons_per_um3=400.0),
        "max_defocus_um": 10.0,
        "psf_z_step_um": 0.25,
        "psf_cache_dir": cache_dir,
    }
    base.update(changes)
    return SimulatorConfig(**base)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("psf-cache")


@pytest.fixture(scope="module")
def scope(cache_dir) -> SimulatedMicroscope:
    return SimulatedMicroscope(OpticsConfig(), _simulator(cache_dir))


def _normalised_variance(image: np.ndarray) -> float:
    image = image.astype(np.float64)
    return float(image.var() / image.mean())


def test_sharpness_peaks_at_focus_and_falls_on_both_sides(
    scope: SimulatedMicroscope,
) -> None:
    step = 0.5
    defocus = np.arange(-6.0, 6.0 + step / 2, step)
    sharpness = np.array([_normalised_variance(scope.expected_photons(d, (20.0, 30.0), SHAPE)) for d in defocus])
    assert abs(defocus[int(np.argmax(sharpness))]) <= step
    centre = len(defocus) // 2
    # falls off monotonically on both sides (beyond the one-step tolerance around the peak)
    assert np.all(np.diff(sharpness[: centre - 1]) > 0) and np.all(np.diff(sharpness[centre + 1 :]) < 0)
    assert max(sharpness[0], sharpness[-1]) < 0.9 * sharpness[centre]


def test_above_and_below_focus_differ(scope: SimulatedMicroscope) -> None:
    # the focal shift of a dry objective into water: deeper sample planes focus later, by less than 1:1 on the stage
    paraxial = scope.optics.immersion_index / scope.optics.sample_index
    assert 0.9 * paraxial < scope.psf_bank.stage_um_per_sample_um < 1.01 * paraxial
    for distance in (2.0, 5.0, 8.0):
        above = (
            scope.expected_photons(+distance, (0.0, 0.0), SHAPE) - scope.simulator.specimen.background_photons_per_px
        )
        below = (
            scope.expected_photons(-distance, (0.0, 0.0), SHAPE) - scope.simulator.specimen.background_photons_per_px
        )
        difference = np.abs(above - below).sum() / np.abs(above).sum()
        assert difference > 0.01, distance


def test_a_correction_collar_mismatch_makes_above_and_below_focus_differ_more() -> None:
    """A plate bottom 100 um thicker than the collar setting adds spherical aberration: the PSFs at +d and -d,
    nearly mirror images with a matched collar (2-3 % apart), then differ by a third or more."""
    from acquire_refocus.sim.psf import compute_psf_bank

    def asymmetry(coverslip_thickness_um: float) -> np.ndarray:
        optics = OpticsConfig(coverslip_thickness_um=coverslip_thickness_um, collar_thickness_um=170.0)
        bank = compute_psf_bank(optics, max_defocus_um=10.0, z_step_um=1.0, depth_um=6.5)
        centre = len(bank.defocus_um) // 2
        distances = (2, 5, 10)
        return np.array([np.abs(bank.plane(centre + d) - bank.plane(centre - d)).sum() for d in distances])

    matched, mismatched = asymmetry(170.0), asymmetry(270.0)
    assert np.all(matched < 0.05), matched
    assert np.all(mismatched > 0.3), mismatched


def _adu_stats(camera: Camera, photons: float, n: int = 400_000, seed: int = 1) -> tuple[np.ndarray, float, float]:
    frame = camera.expose(np.full((n // 400, 400), photons, np.float32), np.random.default_rng(seed))
    values = frame.astype(np.float64).ravel()
    return values, float(values.mean()), float(values.var())


@pytest.mark.parametrize("photons", [1.5, 3.0, 11.0, 40.0, 2000.0])
def test_noise_matches_camera_model(photons: float) -> None:
    config = CameraConfig()
    camera = Camera(config)
    _, mean, var = _adu_stats(camera, photons)
    gain, offset = config.gain_adu_per_electron, config.offset_adu
    expected_mean = offset + gain * config.quantum_efficiency * photons
    assert mean == pytest.approx(expected_mean, abs=0.02 * (expected_mean - offset) + 0.05)
    expected_var = gain * (expected_mean - offset) + (gain * config.read_noise_electrons) ** 2 + 1 / 12  # + rounding
    assert var == pytest.approx(expected_var, rel=0.03)


@pytest.mark.parametrize("read_noise", [1.6, 0.3])
def test_normal_branch_close_to_exact_poisson(read_noise: float) -> None:
    """Just above the threshold, the fast branch's ADU distribution is within 0.01 (Kolmogorov) of the exact one."""
    config = CameraConfig(read_noise_electrons=read_noise)
    camera = Camera(config)
    electrons = exact_below_electrons(read_noise) * 1.05
    fast, _, _ = _adu_stats(camera, electrons / config.quantum_efficiency)
    rng = np.random.default_rng(7)
    exact = rng.poisson(electrons, fast.size) + rng.normal(0.0, config.read_noise_electrons, fast.size)
    exact = np.rint(config.offset_adu + config.gain_adu_per_electron * exact)
    grid = np.arange(min(fast.min(), exact.min()), max(fast.max(), exact.max()) + 1)
    cdf_fast = np.searchsorted(np.sort(fast), grid, side="right") / fast.size
    cdf_exact = np.searchsorted(np.sort(exact), grid, side="right") / exact.size
    assert np.abs(cdf_fast - cdf_exact).max() < 0.01
    # and the third central moment (skewness) is carried over
    assert np.mean((fast - fast.mean()) ** 3) == pytest.approx(np.mean((exact - exact.mean()) ** 3), rel=0.25)


def test_saturation_clips_at_max() -> None:
    config = CameraConfig(bit_depth=12)
    frame = Camera(config).expose(np.full((32, 32), 1e7, np.float32), np.random.default_rng(0))
    assert frame.dtype == np.uint16 and int(frame.max()) == config.max_adu == 4095 and int(frame.min()) == 4095


def test_drift_models() -> None:
    linear = Drift(DriftConfig(model="linear", rate_um_per_min=1.5))
    assert linear.drift_um(120.0) == pytest.approx(3.0)
    thermal = Drift(DriftConfig(model="thermal", amplitude_um=8.0, time_constant_s=100.0))
    assert thermal.drift_um(0.0) == 0.0
    assert thermal.drift_um(100.0) == pytest.approx(8.0 * (1 - math.exp(-1)))
    assert thermal.drift_um(2000.0) == pytest.approx(8.0, abs=1e-6)
    steps = Drift(DriftConfig(model="steps", step_um=4.0, step_interval_s=60.0, seed=3))
    values = [steps.drift_um(t) for t in (0.0, 59.9, 60.0, 119.9, 120.0)]
    assert values[0] == values[1] == 0.0
    assert abs(values[2]) == 4.0 and values[3] == values[2] and abs(values[4] - values[3]) == 4.0
    assert Drift(DriftConfig(model="none")).drift_um(1e4) == 0.0


def test_random_walk_reproducible_with_diffusion_scale() -> None:
    config = DriftConfig(model="random_walk", random_walk_um_per_sqrt_s=0.2, seed=5)
    first, second = Drift(config), Drift(config)
    times = [1000.0, 3.3, 250.0, 0.0]
    assert [first.drift_um(t) for t in times] == [second.drift_um(t) for t in reversed(times)][::-1]
    assert first.drift_um(0.0) == 0.0
    assert Drift(config.model_copy(update={"seed": 6})).drift_um(250.0) != first.drift_um(250.0)
    t = 100.0
    ends = np.array([Drift(config.model_copy(update={"seed": s})).drift_um(t) for s in range(300)])
    assert ends.var() == pytest.approx(0.2**2 * t, rel=0.25)


def test_tilt_varies_defocus_across_field(cache_dir) -> None:
    tilt = 60.0  # um per mm: 2.5 um of defocus across a 41.6 um frame
    simulator = _simulator(cache_dir, drift=DriftConfig(model="none", tilt_x_um_per_mm=tilt))
    tilted = SimulatedMicroscope(OpticsConfig(), simulator)
    assert tilted.focus_z_um((500.0, 0.0)) - tilted.focus_z_um((0.0, 0.0)) == pytest.approx(tilt * 0.5)
    frame = tilted.render(tilted.focus_z_um(), noise=False).astype(np.float64)
    half_width_um = SHAPE[1] / 2 * tilted.pixel_size_um
    left_defocus = +tilt * half_width_um / 1000.0  # left edge: focus lower, so the stage sits too deep
    flat = SimulatedMicroscope(OpticsConfig(), _simulator(cache_dir))
    at_left = flat.render(flat.focus_z_um() + left_defocus, noise=False).astype(np.float64)
    at_right = flat.render(flat.focus_z_um() - left_defocus, noise=False).astype(np.float64)
    edge = slice(0, 12)
    assert np.abs(frame[:, edge] - at_left[:, edge]).mean() < 0.5 * np.abs(frame[:, edge] - at_right[:, edge]).mean()
    edge = slice(-12, None)
    assert np.abs(frame[:, edge] - at_right[:, edge]).mean() < 0.5 * np.abs(frame[:, edge] - at_left[:, edge]).mean()


def test_seeds_reproduce_and_cache_is_reused(cache_dir, scope: SimulatedMicroscope) -> None:
    again = SimulatedMicroscope(OpticsConfig(), _simulator(cache_dir))
    assert again.psf_bank_from_cache
    np.testing.assert_array_equal(again.psf_bank.psf_quadrant, scope.psf_bank.psf_quadrant)
    fresh = SimulatedMicroscope(OpticsConfig(), _simulator(cache_dir))
    frames_a = [again.render(100.0 + dz, (10.0, 5.0)) for dz in (0.0, 3.0)]
    frames_b = [fresh.render(100.0 + dz, (10.0, 5.0)) for dz in (0.0, 3.0)]
    for a, b in zip(frames_a, frames_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(frames_a[0], again.render(100.0, (10.0, 5.0)))  # the noise moves on
    other = SimulatedMicroscope(OpticsConfig(), _simulator(cache_dir, seed=1))
    assert other.psf_bank_from_cache
    assert np.abs(other.render(100.0, noise=False).astype(float) - fresh.render(100.0, noise=False)).mean() > 1.0


def test_render_stack_and_ground_truth(scope: SimulatedMicroscope) -> None:
    frames, truth = scope.render_stack([-4.0, 0.0, 4.0], (3.0, 4.0), rng=np.random.default_rng(0), shape_px=(64, 96))
    assert frames.shape == (3, 64, 96) and frames.dtype == np.uint16
    assert truth.shape == (64, 96) and truth.dtype == np.float32
    clean, _ = scope.render_stack([0.0], (3.0, 4.0), noise=False, shape_px=(64, 96))
    np.testing.assert_allclose(clean[0], truth, atol=0.51)
    assert truth.min() >= scope.simulator.camera.offset_adu
    # the noisy in-focus plane scatters around the truth with the camera's variance
    residual = frames[1].astype(np.float64) - truth
    assert abs(residual.mean()) < 1.0
    # moving the stage in XY shows other cells
    _, elsewhere = scope.render_stack([0.0], (60.0, 4.0), noise=False, shape_px=(64, 96))
    assert np.abs(elsewhere - truth).mean() > 1.0
