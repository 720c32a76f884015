"""The simulated widefield fluorescence microscope: specimen, defocus PSF bank, camera, drift and tilt.

Image formation: the camera sees the plane at the current focus of (3-D specimen convolved with the 3-D PSF), i.e.
``sum_k plane_k * PSF(d - z_k * s)`` where ``d`` is the stage defocus of the specimen mid-plane, ``z_k`` the depth
of specimen plane k relative to the mid-plane (sample um) and ``s`` the focal-shift factor (stage um per sample
um, see `psf.py`). The PSF bank reaches beyond `max_defocus_um` by the specimen's half-thickness, so frames up to
+-max_defocus_um are exact for every specimen plane; beyond that the nearest bank PSF is used. All defocus values
are in stage micrometres: ``defocus_um = stage Z - stage Z at which the specimen mid-plane is in focus``; moving
the stage by ``-defocus_um`` restores focus.

Speed: per stage position, the specimen planes of the frame window are Fourier transformed once (cached); per
frame, each plane's spectrum is multiplied by the real, even transfer function of its bank PSF (computed once per
bank plane and FFT grid, LRU-cached) and accumulated, followed by one inverse FFT. The window is padded by the PSF
radius, so the circular convolution never wraps light from one edge onto the other.

Tilt: with a tilted sample the defocus varies linearly across the frame. The frame is rendered at a few defocus
values spanning the frame's range (at most `_TILT_NODE_SPACING_UM` apart) and blended pixel by pixel with linear
weights; the depth of field of the default optics is 3 um, so the blend is indistinguishable from a per-pixel PSF.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.fft

from acquire_refocus.config import OpticsConfig, SimulatorConfig
from acquire_refocus.sim.camera import Camera
from acquire_refocus.sim.drift import Drift
from acquire_refocus.sim.psf import OtfCache, load_or_compute_psf_bank
from acquire_refocus.sim.specimen import Specimen, specimen_for_optics
from acquire_refocus.sim.volume import SpecimenVolume

_TILT_NODE_SPACING_UM = 1.0
_MAX_TILT_NODES = 9
_SPECTRA_CACHE_WINDOWS = 2
_WORKERS = os.cpu_count() or 1


class SimulatedMicroscope:
    """A deterministic microscope: same configs (and seed) give the same frames."""

    def __init__(
        self,
        optics: OpticsConfig | None = None,
        simulator: SimulatorConfig | None = None,
        specimen: SpecimenVolume | None = None,
    ) -> None:
        """`specimen` replaces the procedural one (e.g. a real volume, sim/volume.py); it must be sampled at the
        optics' pixel size."""
        self.optics = optics if optics is not None else OpticsConfig()
        self.simulator = simulator if simulator is not None else SimulatorConfig()
        sim = self.simulator
        self.pixel_size_um = float(self.optics.pixel_size_um)
        self.specimen: SpecimenVolume = (
            specimen
            if specimen is not None
            else Specimen(specimen_for_optics(sim.specimen, self.optics), self.pixel_size_um, seed=sim.seed)
        )
        # the bank reaches beyond max_defocus_um by the specimen's half-thickness, so that every specimen plane of a
        # frame at +-max_defocus_um has its own PSF (paraxial focal shift ni/ns bounds the stage distance)
        reach_um = self.specimen.depth_um * self.optics.immersion_index / self.optics.sample_index
        bank_half_um = sim.max_defocus_um + math.ceil(reach_um / sim.psf_z_step_um + 1) * sim.psf_z_step_um
        self.psf_bank, self.psf_bank_from_cache = load_or_compute_psf_bank(
            self.optics,
            max_defocus_um=bank_half_um,
            z_step_um=sim.psf_z_step_um,
            depth_um=self.specimen.depth_um,
            cache_dir=sim.psf_cache_dir,
            model=sim.psf_model,
        )
        self.camera = Camera(sim.camera)
        self.drift = Drift(sim.drift)
        self._otf = OtfCache(self.psf_bank)
        self._rng = np.random.default_rng(np.random.SeedSequence([sim.seed, 0xCA3E]))
        self._spectra: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- geometry and focus
    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height_px, width_px) of a camera frame."""
        return (self.simulator.camera.height_px, self.simulator.camera.width_px)

    def focus_z_um(self, stage_xy_um: Sequence[float] = (0.0, 0.0), t_s: float = 0.0) -> float:
        """Stage Z at which the specimen mid-plane at the field centre is in focus: nominal + drift(t) + tilt(xy)."""
        x_um, y_um = float(stage_xy_um[0]), float(stage_xy_um[1])
        return float(self.simulator.focus_z_um + self.drift.drift_um(t_s) + self.drift.tilt_um(x_um, y_um))

    def defocus_um(
        self,
        stage_z_um: float,
        stage_xy_um: Sequence[float] = (0.0, 0.0),
        t_s: float = 0.0,
    ) -> float:
        """Signed defocus at the field centre (stage um): positive when the focal plane lies too deep."""
        return float(stage_z_um) - self.focus_z_um(stage_xy_um, t_s)

    # ---------------------------------------------------------------- rendering
    def render(
        self,
        stage_z_um: float,
        stage_xy_um: Sequence[float] = (0.0, 0.0),
        t_s: float = 0.0,
        *,
        noise: bool = True,
        rng: np.random.Generator | None = None,
        shape_px: tuple[int, int] | None = None,
        exposure_ms: float | None = None,
    ) -> np.ndarray:
        """A uint16 camera frame with the stages at (stage_xy_um, stage_z_um) at simulated time t_s.

        Without `rng`, noise comes from the microscope's own generator (seeded by `simulator.seed`), so a sequence
        of frames is reproducible. `exposure_ms` scales signal and background photons relative to
        `camera.exposure_ms` (the exposure `specimen.photons_per_um3` is given for); None means that exposure.
        """
        shape = self._shape(shape_px)
        centre_defocus = self.defocus_um(stage_z_um, stage_xy_um, t_s)
        with self._lock:
            spectra = self._window_spectra(stage_xy_um, shape)
            if not self.drift.has_tilt:
                photons = self._photons(spectra, shape, centre_defocus)
            else:
                photons = self._tilted_photons(spectra, shape, centre_defocus)
            if exposure_ms is not None:
                photons = photons * np.float32(exposure_ms / self.camera.config.exposure_ms)
            return self.camera.expose(photons, self._pick_rng(rng), noise=noise)

    def render_stack(
        self,
        defocus_um: Sequence[float],
        stage_xy_um: Sequence[float] = (0.0, 0.0),
        *,
        noise: bool = True,
        rng: np.random.Generator | None = None,
        shape_px: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames at the given stage defocus values (no drift, no tilt) and the noiseless in-focus ground truth.

        Returns (uint16 [Z, H, W], float32 [H, W]); the ground truth is the expected camera response in ADU at zero
        defocus (offset included, saturation applied, no noise, not rounded). One specimen FFT serves all planes.
        """
        shape = self._shape(shape_px)
        with self._lock:
            spectra = self._window_spectra(stage_xy_um, shape, cache=False)
            generator = self._pick_rng(rng)
            frames = np.empty((len(defocus_um), *shape), dtype=np.uint16)
            for i, defocus in enumerate(defocus_um):
                frames[i] = self.camera.expose(
                    self._photons(spectra, shape, float(defocus)),
                    generator,
                    noise=noise,
                )
            truth = self.camera.expected_adu(self._photons(spectra, shape, 0.0))
        return frames, truth

    def photon_stack(
        self,
        defocus_um: Sequence[float],
        stage_xy_um: Sequence[float] = (0.0, 0.0),
        shape_px: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless expected photons per pixel (background included) at the given stage defocus values, and at
        zero defocus: (float32 [Z, H, W], float32 [H, W]). For training data whose camera is drawn afterwards."""
        shape = self._shape(shape_px)
        with self._lock:
            spectra = self._window_spectra(stage_xy_um, shape, cache=False)
            stack = np.stack([self._photons(spectra, shape, float(d)) for d in defocus_um])
            return stack, self._photons(spectra, shape, 0.0)

    def expected_photons(
        self,
        defocus_um: float,
        stage_xy_um: Sequence[float] = (0.0, 0.0),
        shape_px: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Noiseless expected photons per pixel (background included) at a uniform stage defocus."""
        shape = self._shape(shape_px)
        with self._lock:
            return self._photons(self._window_spectra(stage_xy_um, shape), shape, float(defocus_um))

    # ---------------------------------------------------------------- internals
    def _shape(self, shape_px: tuple[int, int] | None) -> tuple[int, int]:
        if shape_px is None:
            return self.frame_shape
        height, width = int(shape_px[0]), int(shape_px[1])
        if height < 1 or width < 1:
            raise ValueError(f"shape_px must be two positive sizes (height, width), got {shape_px!r}")
        return (height, width)

    def _pick_rng(self, rng: np.random.Generator | None) -> np.random.Generator:
        return self._rng if rng is None else rng

    def _fft_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        pad = 2 * self.psf_bank.radius_px
        return (
            scipy.fft.next_fast_len(shape[0] + pad, real=True),
            scipy.fft.next_fast_len(shape[1] + pad, real=True),
        )

    def _window_spectra(
        self,
        stage_xy_um: Sequence[float],
        shape: tuple[int, int],
        *,
        cache: bool = True,
    ) -> np.ndarray:
        """rfft2 of the specimen planes around the frame window, padded by the PSF radius: complex64 [K, P, Q/2+1]."""
        fft_shape = self._fft_shape(shape)
        px = self.pixel_size_um
        # frame pixel (r, c) images sample point ((left + c + 0.5) px, (top + r + 0.5) px); the stage XY is the centre
        top = math.floor(float(stage_xy_um[1]) / px - shape[0] / 2 + 0.5)
        left = math.floor(float(stage_xy_um[0]) / px - shape[1] / 2 + 0.5)
        pad = self.psf_bank.radius_px
        key = (top, left, *fft_shape)
        spectra = self._spectra.get(key)
        if spectra is None:
            planes = self.specimen.window(top - pad, left - pad, fft_shape[0], fft_shape[1])
            spectra = scipy.fft.rfft2(planes, workers=_WORKERS).astype(np.complex64, copy=False)
            if cache:
                while len(self._spectra) >= _SPECTRA_CACHE_WINDOWS:
                    self._spectra.pop(next(iter(self._spectra)))
                self._spectra[key] = spectra
        return spectra

    def _photons(self, spectra: np.ndarray, shape: tuple[int, int], defocus_um: float) -> np.ndarray:
        """Expected photons per pixel (float32 [H, W]) at a uniform stage defocus of the specimen mid-plane."""
        bank = self.psf_bank
        fft_shape = self._fft_shape(shape)
        rows_total = fft_shape[0]
        indices = bank.index(defocus_um - self.specimen.plane_z_um * bank.stage_um_per_sample_um)
        accumulator = np.zeros(spectra.shape[1:], dtype=np.complex64)
        scratch = np.empty(spectra.shape[1:], dtype=np.complex64)
        for plane, index in enumerate(indices):
            transfer = self._otf.quarter(int(index), fft_shape)
            rows, cols = transfer.shape
            # positive row frequencies, then the mirrored negative ones (the transfer function is even)
            for target, weights in (
                (slice(0, rows), transfer),
                (slice(rows_total - rows + 1, rows_total), transfer[:0:-1]),
            ):
                if weights.shape[0] == 0:
                    continue
                product = np.multiply(spectra[plane, target, :cols], weights, out=scratch[target, :cols])
                accumulator[target, :cols] += product
        image = scipy.fft.irfft2(accumulator, s=fft_shape, workers=_WORKERS)
        pad = bank.radius_px
        window = image[pad : pad + shape[0], pad : pad + shape[1]]
        photons: npt.NDArray[np.float32] = np.maximum(window, 0.0).astype(np.float32, copy=False)
        photons += np.float32(self.simulator.specimen.background_photons_per_px)
        return photons

    def _tilted_photons(self, spectra: np.ndarray, shape: tuple[int, int], centre_defocus_um: float) -> np.ndarray:
        """Blend renders at a few defocus values by each pixel's own defocus (linear in x and y with a tilt)."""
        px = self.pixel_size_um
        rows = (np.arange(shape[0]) - (shape[0] - 1) / 2) * px
        cols = (np.arange(shape[1]) - (shape[1] - 1) / 2) * px
        # the in-focus stage Z rises with the tilt, so the defocus falls with it
        local = np.asarray(
            centre_defocus_um - (self.drift.tilt_um(cols[None, :], 0.0) + self.drift.tilt_um(0.0, rows[:, None]))
        )
        low, high = float(local.min()), float(local.max())
        count = min(_MAX_TILT_NODES, max(2, math.ceil((high - low) / _TILT_NODE_SPACING_UM) + 1))
        nodes = np.linspace(low, high, count)
        if high - low < 1e-9:
            return self._photons(spectra, shape, centre_defocus_um)
        position = np.clip((local - low) / (nodes[1] - nodes[0]), 0.0, count - 1 - 1e-9)
        lower = np.floor(position).astype(np.int64)
        weight = (position - lower).astype(np.float32)
        result = np.zeros(shape, dtype=np.float32)
        for i, node in enumerate(nodes):
            share = np.where(lower == i, 1.0 - weight, 0.0) + np.where(lower == i - 1, weight, 0.0)
            if share.any():
                result += self._photons(spectra, shape, float(node)) * share.astype(np.float32)
        return result
