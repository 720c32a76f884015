"""The PSF bank: the vectorial model evaluated as matrix products (`sim/vectorial_psf.py`), checked against
psfmodels' own evaluation of the same model; the scalar model computed by psfmodels in chunks and worker
processes, the same PSFs as one call over all planes; progress on the terminal; float32 quadrants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from acquire_refocus.config import OpticsConfig
from acquire_refocus.sim import vectorial_psf
from acquire_refocus.sim.psf import (
    CHUNK_BYTES,
    OtfCache,
    PsfModel,
    PsfParameters,
    best_focus_z,
    compute_psf_bank,
    load_or_compute_psf_bank,
    make_psf_planes,
    planes_per_chunk,
    psf_parameters,
    psf_size_px,
    unfold_quadrant,
)

# 100x / 1.45 oil, 130 nm pixels, into a sample of index 1.40: the optics whose bank did not scale
OIL_100X = OpticsConfig(
    numerical_aperture=1.45,
    magnification=100.0,
    immersion_index=1.515,
    sample_index=1.40,
    camera_pixel_size_um=13.0,
)
MAX_DEFOCUS_UM = 1.5
Z_STEP_UM = 0.25
DEPTH_UM = 3.0


def _single_call_bank(optics: OpticsConfig, model: PsfModel) -> np.ndarray:
    """Every plane in one call, normalised in float64, then float32."""
    kwargs = psf_parameters(optics, optics.pixel_size_um)
    nx = psf_size_px(optics, MAX_DEFOCUS_UM, optics.pixel_size_um)
    count = round(MAX_DEFOCUS_UM / Z_STEP_UM)
    defocus_um = np.arange(-count, count + 1) * Z_STEP_UM
    z_best = best_focus_z(DEPTH_UM, kwargs, model)
    psf = make_psf_planes(z_best + defocus_um, nx, DEPTH_UM, kwargs, model)
    psf /= psf.sum(axis=(1, 2), keepdims=True)
    return psf.astype(np.float32)


@pytest.mark.parametrize(("model", "workers"), [("scalar", 1), ("scalar", 2), ("vectorial", None)])
def test_bank_equals_one_call_over_all_planes(
    model: PsfModel, workers: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = _single_call_bank(OIL_100X, model)
    bank = compute_psf_bank(
        OIL_100X,
        max_defocus_um=MAX_DEFOCUS_UM,
        z_step_um=Z_STEP_UM,
        depth_um=DEPTH_UM,
        model=model,
        workers=workers,
    )
    planes, nx = len(reference), reference.shape[-1]
    if model == "scalar":
        # several chunks, so both the chunk boundaries and (with 2 workers) out-of-order arrival are exercised
        assert workers is not None and planes_per_chunk(nx, planes, workers) < planes
    # the bank keeps a quarter of each plane; mirrored back, the planes are the single call's
    assert bank.psf_quadrant.dtype == np.float32
    assert bank.psf_quadrant.shape == (planes, nx // 2 + 1, nx // 2 + 1)
    assert bank.size_px == nx
    whole = np.stack([bank.plane(i) for i in range(planes)])
    difference = np.abs(whole - reference).max() / reference.max()
    assert difference <= 1e-6, difference
    np.testing.assert_allclose(whole.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # the progress bar reaches its total: planes (scalar), radial samples and then planes (vectorial)
    steps = planes if model == "scalar" else len(vectorial_psf.radii_for(nx, OIL_100X.pixel_size_um)) + planes
    assert f"{steps}/{steps}" in capsys.readouterr().err


def _psfmodels_vectorial(z_um: np.ndarray, nx: int, depth_um: float, kwargs: PsfParameters) -> np.ndarray:
    import psfmodels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        planes = psfmodels.make_psf(z_um.tolist(), nx, pz=depth_um, model="vectorial", normalize=False, **kwargs)
    return np.asarray(planes, dtype=np.float64)


def _peak_normalised(planes: np.ndarray) -> np.ndarray:
    return planes / planes.max(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize(
    ("optics", "defocus_um", "nx"),
    [
        # the shipped optics (20x / 0.45 air into water), 0 to 30 um of defocus
        (OpticsConfig(), np.array([-30.0, -8.0, -2.0, 0.0, 1.0, 5.0, 30.0]), 121),
        # 100x / 1.45 oil into a sample of index 1.52: no critical angle inside the aperture
        (OIL_100X.model_copy(update={"sample_index": 1.52}), np.array([-1.5, -0.5, 0.0, 0.25, 1.5]), 63),
    ],
)
def test_vectorial_planes_equal_psfmodels_where_its_integration_converges(
    optics: OpticsConfig, defocus_um: np.ndarray, nx: int
) -> None:
    """Same model, same pixel integration: within psfmodels' own quadrature error (under 2e-3 of the peak here)."""
    kwargs = psf_parameters(optics, optics.pixel_size_um)
    z_um = best_focus_z(DEPTH_UM, kwargs, "vectorial") + defocus_um
    ours = _peak_normalised(make_psf_planes(z_um, nx, DEPTH_UM, kwargs, "vectorial"))
    theirs = _peak_normalised(_psfmodels_vectorial(z_um, nx, DEPTH_UM, kwargs))
    assert np.abs(ours - theirs).max() < 2e-3


def test_vectorial_planes_converge_where_psfmodels_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """A water sample under an oil objective (index 1.33 below the NA): the integrand has a kink at the critical
    angle. Our quadrature (split there, kink smoothed by a substitution) moves by under 1e-6 of the peak when its
    node count is quadrupled; psfmodels' Simpson rule on its own sample count is off by far more."""
    optics = OIL_100X.model_copy(update={"sample_index": 1.33})
    kwargs = psf_parameters(optics, optics.pixel_size_um)
    z_um = DEPTH_UM + np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    nx = 63
    ours = _peak_normalised(make_psf_planes(z_um, nx, DEPTH_UM, kwargs, "vectorial"))
    monkeypatch.setattr(vectorial_psf, "ANGLE_OVERSAMPLING", 4)
    finer = _peak_normalised(make_psf_planes(z_um, nx, DEPTH_UM, kwargs, "vectorial"))
    assert np.abs(ours - finer).max() < 1e-6
    theirs = _peak_normalised(_psfmodels_vectorial(z_um, nx, DEPTH_UM, kwargs))
    assert np.abs(ours - theirs).max() > 0.02


def test_chunks_stay_within_the_memory_budget_and_spread_over_the_workers() -> None:
    for nx, planes, workers in ((1115, 323, 2), (1031, 305, 1), (209, 363, 2), (89, 11, 2), (4001, 5, 2)):
        chunk = planes_per_chunk(nx, planes, workers)
        assert chunk >= 1
        assert chunk == 1 or chunk * nx * nx * 8 <= CHUNK_BYTES
        assert chunk <= -(-planes // (4 * workers))


def test_bank_from_cache_equals_the_computed_one(tmp_path) -> None:
    computed, from_cache = load_or_compute_psf_bank(
        OIL_100X,
        max_defocus_um=MAX_DEFOCUS_UM,
        z_step_um=Z_STEP_UM,
        depth_um=DEPTH_UM,
        cache_dir=tmp_path,
    )
    assert not from_cache
    loaded, from_cache = load_or_compute_psf_bank(
        OIL_100X,
        max_defocus_um=MAX_DEFOCUS_UM,
        z_step_um=Z_STEP_UM,
        depth_um=DEPTH_UM,
        cache_dir=tmp_path,
    )
    assert from_cache
    assert loaded.psf_quadrant.dtype == np.float32
    np.testing.assert_array_equal(loaded.psf_quadrant, computed.psf_quadrant)


def test_unfolding_mirrors_the_quadrant_about_the_centre() -> None:
    quadrant = np.arange(9, dtype=np.float32).reshape(3, 3)
    plane = unfold_quadrant(quadrant)
    assert plane.shape == (5, 5)
    np.testing.assert_array_equal(plane[2:, 2:], quadrant)
    np.testing.assert_array_equal(plane, plane[::-1, :])
    np.testing.assert_array_equal(plane, plane[:, ::-1])
    assert plane[0, 0] == quadrant[2, 2] and plane[2, 0] == quadrant[0, 2]


def test_transfer_functions_from_the_quadrants_equal_the_ffts_of_the_whole_planes() -> None:
    bank = compute_psf_bank(OIL_100X, max_defocus_um=1.0, z_step_um=0.5, depth_um=DEPTH_UM, workers=1)
    otf = OtfCache(bank)
    fft_shape = (2 * bank.size_px + 6, 2 * bank.size_px + 10)
    for index in range(len(bank.defocus_um)):
        padded = np.zeros(fft_shape)
        padded[: bank.size_px, : bank.size_px] = bank.plane(index)
        # centre of the plane to pixel (0, 0): the transfer function of a centred, even PSF is real
        centred = np.roll(padded, (-bank.radius_px, -bank.radius_px), axis=(0, 1))
        expected = np.fft.rfft2(centred).real
        quarter = otf.quarter(index, fft_shape)
        rows, cols = quarter.shape
        np.testing.assert_allclose(quarter, expected[:rows, :cols], atol=1e-6)
        # the rows of negative frequency mirror the positive ones; what lies beyond the block is negligible
        negative = expected[fft_shape[0] - rows + 1 :, :cols]
        np.testing.assert_allclose(negative, expected[rows - 1 : 0 : -1, :cols], atol=1e-6)
        outside = (expected[rows : fft_shape[0] - rows + 1, :], expected[:, cols:])
        assert max(np.abs(part).max(initial=0.0) for part in outside) < 1e-3


def test_a_narrower_window_is_the_centre_of_the_wider_plane_but_misses_the_halo() -> None:
    """Each pixel is computed independently of the window, so a plane computed at its own geometric blur's window
    differs from the full-width plane only by the light outside that window; with an oil objective
    imaging into index 1.40 that light is not negligible, in focus least of all (the index-mismatch halo), which is
    why every plane keeps the width of the most defocused one (README, "Simulator PSF bank")."""
    kwargs = psf_parameters(OIL_100X, OIL_100X.pixel_size_um)
    defocus_um = np.array([0.0, -MAX_DEFOCUS_UM])
    z_um = best_focus_z(DEPTH_UM, kwargs, "vectorial") + defocus_um
    wide = make_psf_planes(z_um, 241, DEPTH_UM, kwargs, "vectorial")
    outside = []
    for plane, z, d in zip(wide, z_um, defocus_um, strict=True):
        half = psf_size_px(OIL_100X, abs(float(d)), OIL_100X.pixel_size_um) // 2  # 12 px in focus, 62 at 1.5 um
        narrow = make_psf_planes(np.array([z]), 2 * half + 1, DEPTH_UM, kwargs, "vectorial")[0]
        centre = plane[120 - half : 121 + half, 120 - half : 121 + half]
        assert np.abs(narrow - centre).max() <= 1e-9 * plane.max()
        outside.append(1.0 - narrow.sum() / plane.sum())
    # 25 % and 8 % of the light inside 241 px lies outside the windows of 25 and 125 px
    assert outside[0] > 0.2 and outside[1] > 0.05, outside
