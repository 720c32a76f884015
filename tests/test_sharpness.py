"""The band-pass sharpness measure and the fit that turns sharpness at several stage Z into the sharpest Z."""

from __future__ import annotations

import math

import numpy as np
import pytest

from acquire_refocus.config import OpticsConfig
from acquire_refocus.focus import SharpnessSample, sharpness_focus_z
from acquire_refocus.sharpness import BandPassSharpness

pytestmark = pytest.mark.timeout(120)


def test_sharpness_peaks_within_a_micrometre_of_focus_and_falls_off_both_ways(small_field_scope: object) -> None:
    measure = BandPassSharpness.for_optics(OpticsConfig())
    defocus_um = np.arange(-6.0, 6.01, 0.5)
    values = np.array([measure(small_field_scope.render(100.0 + d)) for d in defocus_um])  # type: ignore[attr-defined]
    peak_um = defocus_um[np.argmax(values)]
    assert abs(peak_um) <= 1.0
    at = dict(zip(defocus_um.tolist(), values.tolist(), strict=True))
    for d in (3.0, 6.0):
        assert at[d] < 0.9 * values.max() and at[-d] < 0.9 * values.max()
    assert at[6.0] < at[3.0] and at[-6.0] < at[-3.0]


def test_sharpness_does_not_depend_on_brightness_and_repeats_between_noisy_frames(small_field_scope: object) -> None:
    measure = BandPassSharpness.for_optics(OpticsConfig())
    frames = [small_field_scope.render(101.0) for _ in range(4)]  # type: ignore[attr-defined]
    values = np.array([measure(f) for f in frames])
    assert values.std() / values.mean() < 0.03
    assert measure(frames[0].astype(np.float32) * 3.0) == pytest.approx(values[0], rel=1e-4)


def test_sharpness_is_nan_for_what_it_cannot_measure() -> None:
    measure = BandPassSharpness.for_optics(OpticsConfig())
    assert math.isnan(measure(np.zeros((64, 64), np.uint16)))  # no light
    assert math.isnan(measure(np.zeros((8, 8), np.float32)))
    assert math.isnan(measure(np.zeros((4, 64, 64), np.float32)))
    bad = np.ones((64, 64), np.float32)
    bad[3, 3] = np.nan
    assert math.isnan(measure(bad))
    assert measure(np.full((64, 64), 7.0, np.float32)) == 0.0  # no structure at all
    # a band coarser than the crop holds (focus.sharpness_band_um allows 20 um; 64 px of 65 nm are 4 um)
    assert math.isnan(
        BandPassSharpness(20.0, 0.065)(np.random.default_rng(0).poisson(100, (64, 64)).astype(np.float32))
    )


def test_large_frames_are_measured_on_a_central_crop() -> None:
    rng = np.random.default_rng(0)
    centre = rng.random((512, 512)).astype(np.float32)
    frame = np.zeros((2048, 2048), np.float32)
    frame[768:1280, 768:1280] = centre
    measure = BandPassSharpness.for_optics(OpticsConfig())
    assert measure(frame) == pytest.approx(measure(centre), rel=1e-5)


def test_the_band_scales_with_the_pixel_size() -> None:
    """The same structure sampled twice as finely looks half as sharp per pixel: the band moves with it."""
    rng = np.random.default_rng(1)
    from scipy import ndimage

    coarse = ndimage.gaussian_filter(rng.random((256, 256)), 2.0).astype(np.float32)
    fine = ndimage.zoom(coarse, 2, order=1)
    measure = BandPassSharpness.for_optics(OpticsConfig())
    at_coarse = measure(coarse, pixel_size_um=0.325)
    assert measure(fine, pixel_size_um=0.1625) == pytest.approx(at_coarse, rel=0.25)
    assert measure(fine, pixel_size_um=0.325) < 0.5 * at_coarse


def gaussian_samples(focus_z_um: float, z_um: list[float], width_um: float = 4.0) -> list[SharpnessSample]:
    return [SharpnessSample(z, 2.0 - (z - focus_z_um) ** 2 / (2 * width_um**2), 0) for z in z_um]


def test_fit_finds_the_sharpest_z_from_two_or_more_planes() -> None:
    assert sharpness_focus_z(gaussian_samples(101.3, [100.0, 100.5]), 4.0, 4.0) == pytest.approx(101.3)
    assert sharpness_focus_z(gaussian_samples(98.0, [99.5, 100.0, 100.5]), 4.0, 4.0) == pytest.approx(98.0)


def test_fit_needs_a_z_spread_and_is_trusted_only_within_its_range() -> None:
    assert sharpness_focus_z(gaussian_samples(101.0, [100.0]), 4.0, 4.0) is None
    assert sharpness_focus_z(gaussian_samples(101.0, [100.0, 100.0, 100.0]), 4.0, 4.0) is None
    assert sharpness_focus_z(gaussian_samples(120.0, [100.0, 100.5]), 4.0, 4.0) == pytest.approx(100.25 + 4.0)


def test_the_z_spread_the_fit_needs_scales_with_the_sharpness_width() -> None:
    """A 60x / 1.4 oil objective dithers +-0.047 um (a tenth of its 0.47 um depth of field; width 0.63 um): the fit
    must start from frames that span 0.094 um there, while at 20x / 0.45 (width 4 um) that span is too small."""
    planes = [100.0 - 0.047, 100.0 + 0.047]
    assert sharpness_focus_z(gaussian_samples(100.2, planes, 0.63), 0.63, 0.63) == pytest.approx(100.2)
    assert sharpness_focus_z(gaussian_samples(100.2, planes, 4.0), 4.0, 4.0) is None


@pytest.mark.parametrize("assumed_width_um", [2.5, 4.0, 5.0])
def test_a_wrong_width_still_converges_when_the_fit_is_repeated(assumed_width_um: float) -> None:
    """True width 4 um. Each fit lands (w_assumed / w_true)^2 of the way from the planes' mean Z to the peak: short
    of it or beyond, but as long as that factor is below 2, repeating the fit from where it lands settles there."""
    z = 100.0
    for _ in range(12):
        fitted = sharpness_focus_z(gaussian_samples(102.0, [z - 0.5, z + 0.5]), assumed_width_um, 4.0)
        assert fitted is not None
        z = fitted
    assert z == pytest.approx(102.0, abs=0.05)


def test_the_calibration_fit_recovers_peak_and_width_and_refuses_a_stack_without_a_peak() -> None:
    from acquire_refocus.sharpness import fit_sharpness_curve

    z = np.arange(-8.0, 8.01, 1.0)
    log_s = 2.0 - (z - 0.6) ** 2 / (2 * 4.2**2)
    log_s[0] = math.nan  # an unmeasurable plane is left out
    curve = fit_sharpness_curve(z, log_s, range_um=4.0)
    assert curve is not None
    assert curve.peak_z_um == pytest.approx(0.6) and curve.width_um == pytest.approx(4.2)
    assert curve.planes_used == 9  # z = -3 .. 5: within 4 um of the sharpest plane (1 um)
    assert curve.residual_rms == pytest.approx(0.0, abs=1e-9)
    assert fit_sharpness_curve(z, -log_s, range_um=4.0) is None  # a minimum, not a peak
    assert fit_sharpness_curve(z[:2], log_s[:2], range_um=4.0) is None
