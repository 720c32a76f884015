"""Domain-randomised training data, held-out evaluation data, and frames outside a model's envelope."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from acquire_refocus.config import CameraConfig, OpticsConfig, RandomizationConfig, SpecimenConfig, parse_config
from acquire_refocus.errors import ConfigError
from acquire_refocus.model import data as training_data
from acquire_refocus.model.envelope import envelope_flags, noise_std, signal_to_noise
from acquire_refocus.sim import randomization
from acquire_refocus.sim.families import FAMILIES
from acquire_refocus.sim.specimen import Specimen

SMALL_ENVELOPE = {"field_size_um": 80.0, "optics_variants": 1, "layer_thickness_um": [2.0]}


@pytest.mark.parametrize("family", [*FAMILIES, "mixture"])
def test_each_family_is_a_seeded_periodic_volume_with_structure(family: str) -> None:
    config = SpecimenConfig(family=family, field_size_um=(80.0, 80.0))
    first = Specimen(config, 0.325, seed=7)
    again = Specimen(config, 0.325, seed=7)
    other = Specimen(config, 0.325, seed=8)
    np.testing.assert_array_equal(first.planes, again.planes)
    assert not np.array_equal(first.planes, other.planes)
    assert first.planes.dtype == np.float32 and first.planes.min() >= 0
    projection = first.planes.sum(axis=0)
    assert projection.std() > 0.1 * projection.mean() > 0  # structure, not a uniform sheet
    # periodic: a window across the field's edge wraps to the other side
    height = first.field_shape_px[0]
    np.testing.assert_array_equal(first.window(height - 2, 0, 4, 4)[:, 2:], first.window(0, 0, 2, 4))


def test_beads_lie_in_one_plane_and_their_blur_grows_with_the_distance() -> None:
    """The thin specimen: every bead in the mid-plane, so a frame's blur is set by |d| alone (the other families
    spread over um in z)."""
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    config = SpecimenConfig(family="beads", field_size_um=(80.0, 80.0), background_photons_per_px=0.0)
    planes = Specimen(config, 0.325, seed=3).planes
    lit = np.flatnonzero(planes.reshape(len(planes), -1).max(axis=1) > 0)
    assert lit.tolist() == [len(planes) // 2]
    simulator = parse_config({"simulator": {"specimen": config.model_dump()}}).simulator
    scope = SimulatedMicroscope(OpticsConfig(), simulator.model_copy(update={"seed": 3}))
    stack, _ = scope.photon_stack([0.0, -2.0, 2.0, 5.0, 10.0], (40.0, 40.0), (128, 128))
    brightest = [np.sort(frame.ravel())[-160:].sum() / frame.sum() for frame in stack]  # top 1 % of the pixels
    assert brightest[0] > brightest[1] > brightest[3] > brightest[4]
    assert brightest[1] == pytest.approx(brightest[2], rel=0.15)  # +-d blur alike


def test_nuclei_specimen_is_unchanged_by_the_families() -> None:
    """The default family renders exactly what it did before families existed (figures of tests and README)."""
    specimen = Specimen(SpecimenConfig(field_size_um=(80.0, 80.0)), 0.325, seed=3)
    assert specimen.nuclei and specimen.planes.shape[0] == len(specimen.plane_z_um)


def test_camera_draw_sets_the_in_focus_peak_and_keeps_defects_out_of_the_truth() -> None:
    rng = np.random.default_rng(0)
    truth_photons = np.zeros((64, 64), np.float32)
    truth_photons[20:40, 20:40] = 10.0
    photons = np.stack([truth_photons, np.full((64, 64), 1.0, np.float32)])
    draw = randomization.CameraDraw(
        peak_photons=1000.0,
        background_fraction=0.1,
        read_noise_electrons=1.0,
        gain_adu_per_electron=2.0,
        offset_adu=100.0,
        hot_pixel_fraction=0.01,
        fixed_pattern_adu=0.0,
    )
    base = CameraConfig(quantum_efficiency=0.8)
    frames, truth = randomization.expose_window(photons, truth_photons, draw, base, rng)
    assert frames.dtype == np.uint16 and frames.shape == photons.shape
    # truth: offset + gain * QE * (scaled signal + background), no hot pixels
    assert truth.max() == pytest.approx(100 + 2.0 * 0.8 * (1000 + 100), rel=1e-4)
    assert truth.min() == pytest.approx(100 + 2.0 * 0.8 * 100, rel=1e-4)
    hot = frames[0] > truth.max() + 400
    assert 5 <= hot.sum() <= 100  # ~1 % of 4096 pixels carry a hot pixel's dark signal, in the frames only
    assert abs(float(np.median(frames[0][~hot] - truth[~hot]))) < 3


def test_draws_stay_inside_the_envelope_and_specimens_are_deterministic() -> None:
    envelope = RandomizationConfig()
    rng = np.random.default_rng(1)
    draws = [randomization.draw_camera(envelope, rng) for _ in range(200)]
    peaks = [d.peak_photons for d in draws]
    assert 20 <= min(peaks) and max(peaks) <= 5000 and np.median(peaks) < 1000  # log-uniform: median ~316
    assert all(0.5 <= d.read_noise_electrons <= 3.0 for d in draws)
    assert randomization.draw_specimen(envelope, 5) == randomization.draw_specimen(envelope, 5)
    families = {randomization.draw_specimen(envelope, seed).family for seed in range(60)}
    assert families == set(envelope.families) and "membranes" not in families
    variants = randomization.optics_variants(envelope, OpticsConfig(), seed=0)
    assert variants[0] == OpticsConfig() and len(variants) == envelope.optics_variants + 1
    assert all(abs(v.numerical_aperture - 0.45) <= 0.04 + 1e-9 for v in variants)
    assert variants == randomization.optics_variants(envelope, OpticsConfig(), seed=0)


def test_the_nucleus_size_axis_scales_the_nuclei_at_the_same_coverage() -> None:
    sized = RandomizationConfig(nucleus_size_factor=(0.5, 2.0))
    draws = [randomization.draw_specimen(sized, seed) for seed in range(1000, 1060)]
    factors = [d.nucleus_size_factor for d in draws]
    assert 0.5 <= min(factors) < 0.7 and 1.5 < max(factors) <= 2.0
    # drawn last: every other axis of a seed is what an envelope without the size range draws
    plain = [randomization.draw_specimen(RandomizationConfig(), seed) for seed in range(1000, 1060)]
    assert [d.family for d in draws] == [d.family for d in plain]
    assert all(d.nucleus_size_factor == 1.0 for d in plain)
    simulator = parse_config({}).simulator
    coverage = []
    for factor in (0.5, 2.0):
        draw = randomization.SpecimenDraw("nuclei", 1.0, 6.0, 0, nucleus_size_factor=factor)
        config = randomization.specimen_simulator(sized, simulator, draw, seed=1000).specimen
        assert config.nucleus_diameter_um == pytest.approx(tuple(factor * d for d in (7.0, 14.0)))
        assert config.nucleus_thickness_um == pytest.approx(tuple(factor * t for t in (4.0, 7.0)))
        specimen = Specimen(config, pixel_size_um=0.65, seed=1000)
        diameters = [2 * max(n.semi_axes_um[:2]) for n in specimen.nuclei]
        assert np.median(diameters) == pytest.approx(factor * 10.5, rel=0.2)
        coverage.append(sum(math.pi * n.semi_axes_um[0] * n.semi_axes_um[1] for n in specimen.nuclei) / 200.0**2)
    assert coverage[1] == pytest.approx(coverage[0], rel=0.5)  # 16x the area per nucleus, 1/16 as many
    # the other families read nuclei_per_mm2 as their density and the nuclei's thickness as their depth: untouched
    filaments = randomization.SpecimenDraw("filaments", 1.0, 6.0, 0, nucleus_size_factor=2.0)
    unscaled = randomization.specimen_simulator(sized, simulator, filaments, seed=1000).specimen
    assert unscaled.nuclei_per_mm2 == simulator.specimen.nuclei_per_mm2
    assert unscaled.nucleus_thickness_um == simulator.specimen.nucleus_thickness_um


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"peak_photons": [5000, 20]}, "peak_photons"),
        ({"peak_photons": [0, 20]}, "positive"),
        ({"families": []}, "families"),
        ({"families": ["nuclei", "plankton"]}, "families"),
        ({"layer_thickness_um": [-1]}, "layer_thickness_um"),
        ({"nucleus_size_factor": [2, 0.5]}, "nucleus_size_factor"),
        ({"nucleus_size_factor": [0.3, 1]}, r"between 0.4 and 2.5, got \[0.3, 1.0\]"),
        ({"nucleus_size_factor": [1, 3]}, "nucleus_size_factor"),
    ],
)
def test_a_bad_envelope_is_a_config_error(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"training": {"randomization": bad}})


def test_randomised_windows_differ_in_family_camera_and_come_with_their_truth() -> None:
    config = parse_config(
        {
            "training": {
                "randomization": SMALL_ENVELOPE,
                "train_fields": 12,
                "validation_fields": 2,
                "defocus_range_um": [-10, 10],
            }
        }
    )
    train, validation = training_data.randomized_sources(config, window_px=64)
    assert len(validation) == 2 and all(w.planes.shape == (8, 64, 64) for w in validation)
    assert {s // 1000 for s in train.seeds} == {1}  # training seeds 1000+, validation 2000+: disjoint
    assert all(w.name.startswith("seed2") for w in validation)
    # each window names its specimen family (the physics-path calibration checks every family on its own)
    assert all(w.family in (*FAMILIES, "mixture") and f"_{w.family}_" in w.name for w in validation)
    rng = np.random.default_rng(0)
    windows = [train.next_window(rng) for _ in range(6)]
    assert all(w.planes.dtype == np.uint16 and w.truth.shape == (64, 64) for w in windows)
    assert all(np.all(np.abs(w.defocus_um) <= 10) for w in windows)
    offsets = {round(float(np.percentile(w.truth, 1))) for w in windows}
    assert len(offsets) > 1  # every window draws its own camera


def test_noise_and_snr_measure_what_the_camera_did() -> None:
    rng = np.random.default_rng(2)
    noise = rng.normal(100.0, 4.0, (256, 256)).astype(np.float32)
    assert noise_std(noise) == pytest.approx(4.0, rel=0.05)
    assert signal_to_noise(noise) < 4.5
    structured = noise.copy()
    structured[100:140, 100:140] += 200.0
    assert signal_to_noise(structured) > 40


def test_envelope_flags() -> None:
    rng = np.random.default_rng(3)
    frame = rng.normal(100.0, 3.0, (128, 128)).clip(0).astype(np.uint16)
    frame[40:80, 40:80] += 300
    assert envelope_flags(frame, 1.0, None) == ()
    assert envelope_flags(frame, 3.0, None) == ("pixel_size_outside_envelope",)
    assert envelope_flags(frame, 1.0, (2.0, 10.0)) == ("brightness_outside_envelope",)
    assert envelope_flags(frame, 1.0, (20.0, 200.0)) == ()
    saturated = frame.copy()
    saturated[:10] = 65535
    assert "saturated" in envelope_flags(saturated, 1.0, None)
    empty = rng.normal(100.0, 3.0, (128, 128)).astype(np.uint16)
    assert envelope_flags(empty, 1.0, None) == ("nearly_empty",)


def test_refocuser_reports_flags_and_no_confidence_outside_its_envelope(tiny_refocuser: object) -> None:
    rng = np.random.default_rng(4)
    frame = rng.normal(100.0, 3.0, (128, 128)).clip(0).astype(np.uint16)
    frame[40:80, 40:80] += 300
    inside = tiny_refocuser(frame)
    assert inside.flags == ()
    saturated = frame.copy()
    saturated[:20] = 65535
    outside = tiny_refocuser(saturated)
    assert outside.flags == ("saturated",) and outside.confidence == 0.0
    assert outside.image.shape == frame.shape and np.isfinite(outside.image).all()  # still refocused
    assert tiny_refocuser(np.full((64, 64), 7, np.uint16)).flags == ("nearly_empty",)
    assert tiny_refocuser(np.full((64, 64), 65535, np.uint16)).flags == ("saturated", "nearly_empty")


def test_extruded_real_image_keeps_its_projection() -> None:
    import tifffile

    from acquire_refocus.model.ood import REAL_IMAGE, REAL_LABELS
    from acquire_refocus.sim.volume import ExtrudedImage

    image, labels = tifffile.imread(REAL_IMAGE), tifffile.imread(REAL_LABELS)
    volume = ExtrudedImage(image, labels, 0.325, seed=1)
    background = float(np.median(image[labels == 0]))
    np.testing.assert_allclose(volume.planes.sum(axis=0), np.clip(image - background, 0, None), atol=1e-2)
    # nuclei spread over several planes, the background stays in the mid-plane
    depth_planes = (volume.planes > 0).sum(axis=0)[labels > 0]
    assert depth_planes.max() >= 4 and depth_planes.mean() > 1.5
    assert volume.depth_um > 2


def test_real_volume_keeps_its_structure_and_photons() -> None:
    """The real 3-D volume as a specimen: background and its noise gone, photons per um^2 kept through resampling,
    planes grouped to the step asked for and centred on the signal, and a mirrored field with no seam."""
    import tifffile

    from acquire_refocus.model.ood import REAL_VOLUME, REAL_VOLUME_VOXEL_UM
    from acquire_refocus.sim.volume import MeasuredVolume

    stack = tifffile.imread(REAL_VOLUME)
    assert stack.shape == (60, 256, 256)
    volume = MeasuredVolume(stack, REAL_VOLUME_VOXEL_UM, 0.325, max_z_step_um=0.75)
    assert volume.unique_shape_px == (205, 205) and volume.field_shape_px == (410, 410)
    assert volume.planes.shape == (30, 205, 205)
    assert len(volume.plane_z_um) == 30 and np.allclose(np.diff(volume.plane_z_um), 0.58)
    unique = volume.planes
    weights = unique.sum(axis=(1, 2))
    assert abs(float((weights * volume.plane_z_um).sum() / weights.sum())) < 1e-6  # z measured from the centre
    assert weights[:3].sum() < 0.005 * weights.sum()  # the empty planes above the cells: no haze of rectified noise
    # photons per um^2: the whole unique field against the stack's own signal (background removed the same way)
    signal_um2 = unique.sum() / (205 * 0.325) ** 2
    dimmest = stack[np.argsort(stack.mean(axis=(1, 2)))[:6]].astype(np.float64)
    threshold = np.median(dimmest) + 2 * 1.4826 * np.median(np.abs(dimmest - np.median(dimmest)))
    expected_um2 = np.clip(stack - threshold, 0, None).sum() / (256 * 0.26) ** 2
    assert signal_um2 == pytest.approx(expected_um2, rel=0.03)
    # read mirrored: periodic (period 410 px), and a window across an edge of the field continues it without a jump
    np.testing.assert_array_equal(volume.window(0, 0, 205, 205), unique)
    np.testing.assert_array_equal(volume.window(410, -410, 205, 205), unique)
    across = volume.window(195, 0, 20, 20)
    np.testing.assert_array_equal(across[:, 9], unique[:, 204, :20])
    np.testing.assert_array_equal(across[:, 10], unique[:, 204, :20])  # the mirror's first row is the field's last
    np.testing.assert_array_equal(volume.window(405, 0, 10, 5)[:, 5:], unique[:, :5, :5])  # the period wraps
    with pytest.raises(ValueError, match="3-D"):
        MeasuredVolume(stack[0], REAL_VOLUME_VOXEL_UM, 0.325, max_z_step_um=0.75)


def test_ood_evaluation_reports_every_set_with_its_targets(tmp_path: Path, tiny_weights: Path) -> None:
    from acquire_refocus.model.ood import OOD_SOURCES, run_ood_evaluation

    config = parse_config({"engine": {"num_threads": 1}})
    report = run_ood_evaluation(
        config, [("tiny", tiny_weights)], tmp_path / "ood", fields=1, window_px=64, physics=False
    )
    text = report.read_text()
    for name in (
        "simulator nuclei",
        "real nuclei (DSB 2018)",
        "scalar PSF",
        "membranes (held-out family)",
        "beads (one plane)",
        "nuclei, peak 20 photons",
        "nuclei, peak 5000 photons",
        "real nuclei 3-D (cells3d)",
    ):
        assert f"## {name}" in text
    assert all(name in text for name in OOD_SOURCES)
    assert "no harm (gain >= -0.3 dB everywhere)" in text and "reads <= 1 um in focus" in text
    rows = (tmp_path / "ood" / "metrics.csv").read_text().splitlines()
    # the model with and without engine.physics_fusion x 15 signed distances x (10 sets of one field, 5 of them
    # brightness levels, and the real volume's four windows)
    assert len(rows) - 1 == 2 * 15 * (10 + 4)
    with (tmp_path / "ood" / "metrics.csv").open() as handle:
        methods = {row["method"] for row in csv.DictReader(handle)}
    assert methods == {"tiny", "tiny, network alone"}
    assert (tmp_path / "ood" / "reliability.png").stat().st_size > 1000
    assert math.isfinite(float(rows[1].split(",")[6]))


@pytest.fixture(scope="module")
def fusion() -> object:
    from acquire_refocus.model.fusion import OpticalFusion

    return OpticalFusion(OpticsConfig(), margin_um=2.0)


def _bright_frames(defocus_um: float = 25.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noiseless in-focus image of the simulator's nuclei, a bright, low-noise frame of it in focus, and one at
    `defocus_um` (float32, peak 2,000, noise std 3)."""
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    config = parse_config({"simulator": {"specimen": {"field_size_um": [120, 120], "nuclei_per_mm2": 6000}}})
    scope = SimulatedMicroscope(config.optics, config.simulator)
    stack, truth = scope.photon_stack([defocus_um], (60.0, 60.0), (128, 128))
    scale = 2000.0 / truth.max()
    rng = np.random.default_rng(5)
    noisy = [(image * scale + rng.normal(0.0, 3.0, truth.shape)).astype(np.float32) for image in (truth, stack[0])]
    return (truth * scale).astype(np.float32), noisy[0], noisy[1]


def test_fusion_leaves_an_identity_output_alone(fusion: object) -> None:
    _, raw, _ = _bright_frames()
    np.testing.assert_allclose(fusion(raw, raw.copy(), 0.5), raw, atol=1e-2 * raw.std())


def test_fusion_undoes_a_contrast_stretch_of_a_sharp_bright_frame(fusion: object) -> None:
    """The failure it exists for: the network stretched an in-focus, bright frame's contrast by 10 %."""
    truth, raw, _ = _bright_frames()
    stretched = 1.1 * raw - 0.1 * raw.mean()
    fused = fusion(raw, stretched, 2.6)
    error = lambda image: float(np.sqrt(np.mean((image - truth) ** 2)))  # noqa: E731
    assert error(stretched) > 5 * error(raw)
    assert error(fused) < 1.5 * error(raw)


def test_fusion_keeps_a_sharpening_that_defocus_explains(fusion: object) -> None:
    """Far from focus the raw frame is a heavy blur of the truth: a network that restores it keeps its gain."""
    truth, _, blurred = _bright_frames(25.0)
    fused = fusion(blurred, truth.copy(), 25.0)  # a perfect network
    error = lambda image: float(np.sqrt(np.mean((image - truth) ** 2)))  # noqa: E731
    # measured 0.22: the Wiener weight pulls the lowest frequencies, which defocus barely changes, to the raw frame
    assert error(fused) < 0.3 * error(blurred)


def test_fusion_measures_the_noise_a_network_passes_through(fusion: object) -> None:
    """A network that passes the noise on and sharpens it (what the shipped one did to dark bead frames near focus)
    departs from the raw frame by less than the noise, which alone reads as "no error". Probing the network with
    noise shows it passes all of it: the fused frame is then the raw one."""
    import scipy.ndimage

    truth, raw, _ = _bright_frames()

    def sharpening(frame: np.ndarray) -> np.ndarray:
        return np.asarray(frame + 0.5 * (frame - scipy.ndimage.gaussian_filter(frame, 1.5)), dtype=np.float32)

    error = lambda image: float(np.sqrt(np.mean((image - truth) ** 2)))  # noqa: E731
    output = sharpening(raw)
    probed = fusion(raw, output, 0.5, sharpening)
    assert error(probed) < 1.001 * error(raw)
    assert error(fusion(raw, output, 0.5)) > 1.02 * error(raw)  # without the probe (measured +2.9 %)
    np.testing.assert_array_equal(fusion(raw, output, 0.5, sharpening), probed)  # one fixed probe


@pytest.mark.parametrize(
    ("defocus_um", "read_um", "bound", "without_bound"),
    [(1.0, 2.0, 1.0, 1.02), (2.0, 2.0, 1.015, 1.02), (0.0, 4.0, 1.0, 3.0), (1.0, 6.0, 1.06, 3.0)],
)
def test_fusion_keeps_signal_a_network_erases(
    fusion: object,
    defocus_um: float,
    read_um: float,
    bound: float,
    without_bound: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sub-resolution beads near focus, and a network that smooths them away (what networks trained on thick
    specimens did to the OOD suite's bead slide). Defocus only attenuates, so bands whose signal the network erased
    are the raw frame's, however far from focus the head reads the frame. Measured, error against the raw frame's:
    read within the fusion's 2 um margin, 0.99x / 1.00x at 1 / 2 um (bands whose signal is under 3x the noise are
    still blended), 1.04x without the rule; read 2-4 um beyond it (as the retrained 20x / 0.75 preset read beads in
    focus), 0.99x / 1.05x, 6.4x / 4.1x without it."""
    import scipy.ndimage

    from acquire_refocus.model import fusion as fusion_module
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    config = parse_config({"simulator": {"specimen": {"family": "beads", "field_size_um": [120, 120]}}})
    scope = SimulatedMicroscope(config.optics, config.simulator)
    stack, truth = scope.photon_stack([defocus_um], (60.0, 60.0), (128, 128))
    scale = 1000.0 / truth.max()
    raw = (stack[0] * scale + np.random.default_rng(5).normal(0.0, 3.0, truth.shape)).astype(np.float32)

    def smoothing(frame: np.ndarray) -> np.ndarray:
        return np.asarray(scipy.ndimage.gaussian_filter(frame, 1.5), dtype=np.float32)

    error = lambda image: float(np.sqrt(np.mean((image - truth * scale) ** 2)))  # noqa: E731
    guarded = error(fusion(raw, smoothing(raw), read_um, smoothing))
    assert guarded <= bound * error(raw)
    monkeypatch.setattr(fusion_module, "ERASED_SHARE", 0.0)
    assert error(fusion(raw, smoothing(raw), read_um, smoothing)) > without_bound * guarded


def test_the_refocuser_runs_the_noise_probe_through_its_own_engine(tiny_refocuser: object) -> None:
    """The Refocuser's image is the fusion given the engine as its network (the probe runs), not the fusion
    without it: what the daemon publishes is what the OOD suite scored."""
    from acquire_refocus.engines.tiling import infer_frame
    from acquire_refocus.model.normalization import denormalize, frame_scale, normalize

    refocuser = tiny_refocuser
    assert refocuser.fusion is not None
    frame = (np.random.default_rng(8).poisson(60.0, (96, 128)) + 100).astype(np.uint16)
    frame[30:60, 40:90] += 300
    intensity = frame_scale(frame, refocuser.loaded.normalization)
    normalised = normalize(frame, intensity)
    image, focus = infer_frame(refocuser.engine, normalised)

    def network(window: np.ndarray) -> np.ndarray:
        return infer_frame(refocuser.engine, window)[0]

    probed = denormalize(refocuser.fusion(normalised, image, focus.magnitude_um, network), intensity)
    unprobed = denormalize(refocuser.fusion(normalised, image, focus.magnitude_um), intensity)
    result = refocuser(frame).image
    np.testing.assert_allclose(result, probed, rtol=1e-5, atol=1e-3)
    assert float(np.abs(result - unprobed).max()) > 10 * 1e-3


def test_noise_model_reads_the_shot_noise_of_bright_structures() -> None:
    """Poisson + read noise on in-focus nuclei at 500 photons peak: the mean per-pixel variance the fusion weighs
    against is read within 12 %, where the typical pixel's (the background's) is 31 % low. (Sparse bright spots on a
    dark field read 6-54 % low: see model/noise.py for why that is kept.)"""
    from acquire_refocus.model.envelope import noise_std
    from acquire_refocus.model.noise import fit_noise_model
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    config = parse_config({"simulator": {"specimen": {"field_size_um": [120, 120], "nuclei_per_mm2": 6000}}})
    photons, truth = SimulatedMicroscope(config.optics, config.simulator).photon_stack([0.0], (60.0, 60.0), (256, 256))
    mean_photons = photons[0] / truth.max() * 500.0 + 5.0
    gain, read_noise_e, offset = 2.0, 2.0, 100.0
    rng = np.random.default_rng(3)
    frame = gain * (rng.poisson(mean_photons) + rng.normal(0.0, read_noise_e, mean_photons.shape)) + offset
    true_variance = float(np.mean(gain**2 * (mean_photons + read_noise_e**2)))
    model = fit_noise_model(frame.astype(np.float32))
    assert model.mean_variance(frame) == pytest.approx(true_variance, rel=0.12)
    assert noise_std(frame) ** 2 < 0.8 * true_variance
    assert 0.5 * gain < model.slope < 1.5 * gain


def test_fusion_refuses_a_network_that_changes_the_shape(fusion: object) -> None:
    _, raw, _ = _bright_frames()
    with pytest.raises(ValueError, match="must keep the shape"):
        fusion(raw, raw.copy(), 0.5, lambda window: window[:-1, :-1])


def test_a_non_finite_probe_response_leaves_the_fusion_finite(fusion: object) -> None:
    _, raw, _ = _bright_frames()
    calls = []

    def broken_once(window: np.ndarray) -> np.ndarray:
        calls.append(window.shape)
        return np.full_like(window, np.nan) if len(calls) == 1 else window

    fused = fusion(raw, 1.05 * raw, 0.5, broken_once)
    assert np.isfinite(fused).all() and len(calls) == 2


def test_a_larger_margin_keeps_the_fusion_nearer_the_raw_frame() -> None:
    """With all of |d| taken off, the fusion may not sharpen a defocused frame at all: even a perfect network's
    output stays nearer the raw frame than with a 1.84 um margin (the shipped one until 2026-12-07; what
    training.fusion_margin_extra_um buys near focus, and costs far from it)."""
    from acquire_refocus.model.fusion import OpticalFusion

    truth, _, blurred = _bright_frames(10.0)
    departure = {}
    for margin_um in (1.84, 50.0):
        fused = OpticalFusion(OpticsConfig(), margin_um=margin_um)(blurred, truth.copy(), 10.0)
        departure[margin_um] = float(np.sqrt(np.mean((fused - blurred) ** 2)))
    assert departure[50.0] < 0.5 * departure[1.84], departure


def test_margin_is_the_90th_percentile_of_the_excess_near_focus() -> None:
    from acquire_refocus.model.fusion import magnitude_margin_um

    true = np.array([0.0] * 10 + [30.0] * 10)
    estimates = np.concatenate([np.arange(10.0), np.full(10, 50.0)])  # far frames excluded: MARGIN_RANGE_UM
    assert magnitude_margin_um(estimates, true) == pytest.approx(np.percentile(np.arange(10.0), 90))
    assert magnitude_margin_um([0.0, 0.0], [3.0, 4.0]) == 0.0


def test_ood_distances_and_targets_scale_with_the_training_range() -> None:
    """A high-NA model trained over +-6 um is tested over its own depth of field, with targets at the same share of
    its range as the shipped model's (3-10 um and 14 um of +-35 um)."""
    from acquire_refocus.model.ood import OOD_DISTANCES_UM, OodRow, judge, ood_distances_um

    assert ood_distances_um(parse_config({})) == OOD_DISTANCES_UM
    scaled = ood_distances_um(parse_config({"training": {"defocus_range_um": [-6, 6]}}))
    assert scaled == pytest.approx([d * 6 / 35 for d in OOD_DISTANCES_UM], abs=0.01)

    def row(d_um: float, gain_db: float) -> OodRow:
        return OodRow("m", "set", "f", d_um, 20.0, 20.0 + gain_db, 0.9, abs(d_um) + 0.1, 0.5)

    rows = [row(s * d, 4.0 if d < 0.2 else 0.5) for d in scaled for s in (-1, 1)]
    targets = judge(rows, "m")
    near, far, in_focus = "gain >= +3 dB at 0.514-1.71 um", "gain >= +1.5 dB at >= 2.4 um", "reads <= 0.171 um in focus"
    assert {near, far, in_focus} <= set(targets)
    assert targets[near][0] is False and targets[near][1][0] == pytest.approx(0.5)
    assert targets[in_focus][0] is True  # reads 0.1 um at focus


def test_fusion_bank_follows_the_models_training_reach() -> None:
    """The shipped +-35 um model keeps 1 um planes to 40 um; a model trained over +-6 um gets planes 6/35 um apart
    to 6.86 um, so its |d| is not rounded to two depths of field of a high-NA objective."""
    from acquire_refocus.model.fusion import OpticalFusion

    shipped = OpticalFusion(OpticsConfig()).bank
    assert shipped.z_step_um == pytest.approx(1.0) and shipped.defocus_um[-1] == pytest.approx(40.0)
    narrow = OpticalFusion(OpticsConfig(), reach_um=6.0).bank
    assert narrow.z_step_um == pytest.approx(6 / 35, abs=1e-6)
    assert narrow.defocus_um[-1] == pytest.approx(6 + 5 * 6 / 35, abs=0.01)
