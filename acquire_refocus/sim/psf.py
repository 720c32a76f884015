"""The defocus PSF bank of the simulated microscope, computed with `psfmodels` and cached on disk.

Sign convention (checked against the psfmodels source, `scalarPSF.cpp` / `vectorialPSF.cpp`): the optical path
difference contains ``(ci - z) * ni * cos(theta) + zp * sqrt(ns**2 - ni**2 sin(theta)**2)`` with
``ci = zp * (1 - ni / ns)``, i.e. the immersion layer is ``ti = ti0 + ci - z`` thick. Increasing psfmodels' ``z``
thins the immersion layer: the objective moves towards the coverslip and the focal plane moves deeper into the
sample. That is our stage convention, so psfmodels' ``z`` and our stage Z have the same sign and the same unit
(stage micrometres); they differ only by an offset. The paraxial focus of a point at depth ``zp`` lies at
``z = zp``; we locate the actual best focus numerically (on-axis intensity maximum, which also absorbs the
non-paraxial focal shift), so ``z = z_best + defocus``.

Focal shift: with a dry objective (ni = 1.0) imaging into water (ns = 1.33), moving the stage by 1 um moves the
focal plane by more than 1 um in the sample (about ns / ni paraxially, more for marginal rays). Everything in this
package is expressed in *stage* micrometres: the bank is indexed by stage defocus, and a specimen plane that lies
``dz`` micrometres deeper in the sample is in focus ``dz * stage_um_per_sample_um`` stage micrometres later, where
that factor is measured from the model (0.73 for the default optics; the paraxial value ni / ns is 0.75).

Above/below asymmetry: spherical aberration makes the PSF at +d and -d differ; only that lets one frame tell which
side of focus it is on. Two sources are modelled: the aqueous sample behind a dry objective (weak at NA 0.45: with
the default, matched optics the PSFs at +-d differ by 2-3 % L1 for |d| = 2-30 um, L1 = sum |PSF(+d) - PSF(-d)| of
unit-sum PSFs) and a coverslip or plate bottom whose thickness differs from the objective's correction-collar
setting (`coverslip_thickness_um` vs `collar_thickness_um`, psfmodels' tg vs tg0): 100 um of mismatch (about 0.4
waves of spherical aberration at NA 0.45) gives 34-52 %, 200 um gives 61-91 %.
The bank is computed for a point at the specimen's mid-plane depth; the slow change of the aberration over the few
micrometres of a cell monolayer is neglected.

Model: the vectorial model (Aguet et al. 2009), the equations of psfmodels' vectorial PSF, evaluated by
`vectorial_psf.py` as matrix products over one angular grid shared by all planes and radii (radial profiles of all
planes at once, then each plane's pixels from its profile, `_PLANES_PER_EXPANSION` planes at a time). The 100x /
1.45 NA bank of issue 18 (323 planes of 1115 px) takes about 8 s and 0.6 GB where psfmodels' per-plane loops took
297 CPU-seconds; the default 20x bank well under a second. That grid also integrates correctly across the critical
angle of a water sample under an oil objective, where psfmodels' Simpson rule is off by up to tens of per cent of a
plane's peak (vectorial_psf.py). 'scalar' (Gibson-Lanni, the out-of-distribution suite's second PSF model) is
psfmodels' own, computed in chunks of a few planes (`CHUNK_BYTES`: psfmodels holds five float64 copies of every
plane it is asked for), for a large bank in worker processes on every available core, with a progress bar.

Every plane is normalised in float64 to unit sum and kept as the float32 quadrant x, y >= 0 (see `PsfBank`), at the
width of the largest defocus: the light of an in-focus point spreads far beyond its geometric blur (for 100x / 1.45
oil into a sample of index 1.40, 25 % of what falls within 120 px lies beyond 12 px, the index-mismatch halo), so a
window cut to the geometric blur of each plane would change the PSFs by that much (tests/test_sim_psf.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt
import scipy.fft
from tqdm import tqdm

from acquire_refocus.cache_dirs import user_cache_dir
from acquire_refocus.config import OpticsConfig
from acquire_refocus.logs import kv
from acquire_refocus.sim.vectorial_psf import VectorialOptics, quadrant_operator, radial_profiles, radii_for

log = logging.getLogger(__name__)

PsfModel = Literal["vectorial", "scalar"]
_CACHE_FORMAT = 3  # 2: quadrants of the planes; 3: vectorial planes from vectorial_psf.py
# the design working distance only enters psfmodels' constant optical path; any positive value gives the same PSF
_WORKING_DISTANCE_UM = 150.0
# float64 planes per psfmodels call; it holds five such buffers while it computes them
CHUNK_BYTES = 32 * 2**20
# planes expanded from their radial profiles at a time: 16 x 8 bytes x (h + 1)^2, 40 MB for a 100x / 1.45 NA bank
_PLANES_PER_EXPANSION = 16
# below this many planes x pixels of width, starting worker processes (1.5 CPU-seconds each) costs about what it
# saves: the default 20x bank (363 planes of 209 px) took 6.7 CPU-s in this process, 9.6 with two workers
_PARALLEL_MIN_PLANE_PX = 100_000


def default_cache_dir() -> Path:
    """The user's cache directory (~/.cache/acquire-refocus on Linux, or $XDG_CACHE_HOME/acquire-refocus)."""
    return user_cache_dir()


@dataclass(frozen=True)
class PsfBank:
    """Widefield PSFs at evenly spaced stage defocus values, each normalised to unit sum (flux is conserved).

    `plane(i)` is the image of a point source for stage defocus ``defocus_um[i]`` (stage Z minus the stage Z at
    which the point is in focus), n x n pixels centred at pixel (n // 2, n // 2). The point lies on the optical
    axis, so every plane is mirror-symmetric in x and in y, and the bank keeps only the quadrant x, y >= 0 of each
    (a quarter of the memory: 0.4 instead of 1.6 GB for a 100x / 1.45 NA bank).
    """

    defocus_um: np.ndarray  # float64 [Z], ascending, evenly spaced
    psf_quadrant: np.ndarray  # float32 [Z, r + 1, r + 1]: plane rows and columns n // 2 ... n - 1
    pixel_size_um: float
    depth_um: float  # depth of the point source below the coverslip, in the sample
    stage_um_per_sample_um: float  # focal-shift factor: stage motion that refocuses 1 um deeper in the sample
    model: str
    key: str  # hash of everything the bank depends on

    @property
    def z_step_um(self) -> float:
        return float(self.defocus_um[1] - self.defocus_um[0]) if len(self.defocus_um) > 1 else 1.0

    @property
    def radius_px(self) -> int:
        return int(self.psf_quadrant.shape[-1]) - 1

    @property
    def size_px(self) -> int:
        """Width n of a whole plane."""
        return 2 * self.radius_px + 1

    def plane(self, index: int) -> np.ndarray:
        """The whole PSF plane `index`: float32 [n, n], mirrored from its quadrant."""
        return unfold_quadrant(self.psf_quadrant[index])

    def index(self, defocus_um: float | npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
        """Nearest bank plane for each stage defocus, clamped to the bank's range."""
        position = (np.asarray(defocus_um, dtype=np.float64) - float(self.defocus_um[0])) / self.z_step_um
        return np.clip(np.rint(position), 0, len(self.defocus_um) - 1).astype(np.int64)


def unfold_quadrant(quadrant: np.ndarray) -> np.ndarray:
    """[r + 1, r + 1] quadrant (centre at [0, 0]) -> the mirror-symmetric [2r + 1, 2r + 1] plane."""
    rows = np.concatenate([quadrant[:, :0:-1], quadrant], axis=1)
    return np.concatenate([rows[:0:-1], rows], axis=0)


def psf_size_px(optics: OpticsConfig, max_defocus_um: float, pixel_size_um: float) -> int:
    """Odd PSF width covering the geometric blur disc at the largest defocus, with a margin for the rim rings.

    The blur radius is the stage defocus times tan of the marginal ray angle in the immersion medium.
    """
    theta = math.asin(optics.numerical_aperture / optics.immersion_index)
    radius_px = max_defocus_um * math.tan(theta) / pixel_size_um
    half = math.ceil(1.3 * radius_px + 12)
    return 2 * half + 1


class PsfParameters(TypedDict):
    """psfmodels.make_psf's optical parameters (its names: um, refractive indices)."""

    dxy: float
    NA: float
    wvl: float
    ns: float
    ni: float
    ni0: float
    ng: float
    ng0: float
    tg: float
    tg0: float
    ti0: float


def psf_parameters(optics: OpticsConfig, pixel_size_um: float) -> PsfParameters:
    """The optics as psfmodels' parameters, sampled at `pixel_size_um`."""
    return {
        "dxy": pixel_size_um,
        "NA": optics.numerical_aperture,
        "wvl": optics.emission_wavelength_nm / 1000.0,
        "ns": optics.sample_index,
        "ni": optics.immersion_index,
        "ni0": optics.immersion_index,
        "ng": optics.coverslip_index,
        "ng0": optics.coverslip_index,
        "tg": optics.coverslip_thickness_um,
        "tg0": optics.collar_thickness_um,
        "ti0": _WORKING_DISTANCE_UM,
    }


def make_psf_planes(
    z_um: npt.NDArray[np.float64],
    nx: int,
    depth_um: float,
    kwargs: PsfParameters,
    model: PsfModel,
) -> npt.NDArray[np.float64]:
    """PSF planes [len(z_um), nx, nx] in float64, unnormalised, at psfmodels' z values (odd nx).

    'vectorial' is our matrix-product evaluation of psfmodels' vectorial model (`vectorial_psf`), 'scalar' is
    psfmodels' Gibson-Lanni model, one call.
    """
    if model == "vectorial":
        return np.stack([unfold_quadrant(q) for q in vectorial_quadrants(z_um, nx, depth_um, kwargs)])
    import psfmodels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        planes = psfmodels.make_psf(z_um.tolist(), nx, pz=depth_um, model=model, normalize=False, **kwargs)
    return np.asarray(planes, dtype=np.float64)


def _vectorial_optics(kwargs: PsfParameters) -> VectorialOptics:
    return VectorialOptics(
        NA=kwargs["NA"],
        wvl=kwargs["wvl"],
        ns=kwargs["ns"],
        ni=kwargs["ni"],
        ni0=kwargs["ni0"],
        ng=kwargs["ng"],
        ng0=kwargs["ng0"],
        tg=kwargs["tg"],
        tg0=kwargs["tg0"],
        ti0=kwargs["ti0"],
    )


def vectorial_quadrants(
    z_um: npt.NDArray[np.float64],
    nx: int,
    depth_um: float,
    kwargs: PsfParameters,
) -> npt.NDArray[np.float64]:
    """Unnormalised quadrants (see `PsfBank`) [len(z_um), nx // 2 + 1, nx // 2 + 1] of vectorial planes, float64."""
    radii_um = radii_for(nx, kwargs["dxy"])
    profiles = radial_profiles(np.asarray(z_um, dtype=np.float64), radii_um, depth_um, _vectorial_optics(kwargs))
    operator = quadrant_operator(nx, len(radii_um))
    return np.ascontiguousarray((operator @ profiles).T).reshape(len(z_um), nx // 2 + 1, nx // 2 + 1)


def best_focus_z(depth_um: float, kwargs: PsfParameters, model: PsfModel) -> float:
    """psfmodels z of the on-axis intensity maximum for a point at `depth_um` (coarse scan, then fine)."""
    centre = float(depth_um)
    for half_range, step in ((6.0, 0.1), (0.15, 0.005)):
        z = np.arange(centre - half_range, centre + half_range + step / 2, step)
        psf = make_psf_planes(z, 7, depth_um, kwargs, model)
        centre = float(z[int(np.argmax(psf[:, 3, 3]))])
    return centre


def _normalised_planes(
    z_um: np.ndarray, nx: int, depth_um: float, kwargs: PsfParameters, model: PsfModel
) -> np.ndarray:
    """Quadrants (see `PsfBank`) of PSF planes at psfmodels z values, each plane normalised to unit sum in float64
    over the whole plane, returned as float32."""
    psf = make_psf_planes(z_um, nx, depth_um, kwargs, model)
    psf /= psf.sum(axis=(1, 2), keepdims=True)
    return psf[:, nx // 2 :, nx // 2 :].astype(np.float32)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def planes_per_chunk(nx: int, planes: int, workers: int) -> int:
    """Planes per psfmodels call: within `CHUNK_BYTES` of float64, and at least 4 chunks per worker so that the
    progress bar moves and the workers finish together."""
    by_memory = max(1, CHUNK_BYTES // (nx * nx * 8))
    by_balance = max(1, math.ceil(planes / (4 * workers)))
    return min(by_memory, by_balance)


def _vectorial_bank_planes(
    z_um: np.ndarray, nx: int, depth_um: float, kwargs: PsfParameters
) -> npt.NDArray[np.float32]:
    """float32 [Z, nx // 2 + 1, nx // 2 + 1] quadrants of unit-sum vectorial planes: the radial profiles of all
    planes at once, then the pixels `_PLANES_PER_EXPANSION` planes at a time (bounded float64 working memory)."""
    planes = len(z_um)
    radii_um = radii_for(nx, kwargs["dxy"])
    log.info(
        kv(
            "psf_bank_computing",
            model="vectorial",
            planes=planes,
            size_px=nx,
            radii=len(radii_um),
            bank_mb=f"{planes * (nx // 2 + 1) ** 2 * 4 / 2**20:.0f}",
        )
    )
    with tqdm(
        total=len(radii_um) + planes, desc=f"PSF bank, {planes} planes of {nx}x{nx} px", unit="step", mininterval=1.0
    ) as bar:
        profiles = radial_profiles(z_um, radii_um, depth_um, _vectorial_optics(kwargs), bar.update)
        operator = quadrant_operator(nx, len(radii_um))
        # plane sum from its quadrant: the centre pixel once, the other axis pixels twice, the rest four times
        weights = np.full((nx // 2 + 1, nx // 2 + 1), 4.0)
        weights[0, :] = 2.0
        weights[:, 0] = 2.0
        weights[0, 0] = 1.0
        multiplicity = weights.ravel()
        psf = np.empty((planes, nx // 2 + 1, nx // 2 + 1), dtype=np.float32)
        for start in range(0, planes, _PLANES_PER_EXPANSION):
            block = operator @ profiles[:, start : start + _PLANES_PER_EXPANSION]  # [pixels, planes] float64
            block /= multiplicity @ block
            psf[start : start + block.shape[1]] = block.T.reshape(-1, nx // 2 + 1, nx // 2 + 1)
            bar.update(block.shape[1])
    return psf


def _compute_planes(
    z_um: np.ndarray,
    nx: int,
    depth_um: float,
    kwargs: PsfParameters,
    model: PsfModel,
    workers: int | None,
) -> np.ndarray:
    """float32 [Z, nx // 2 + 1, nx // 2 + 1] quadrants of unit-sum planes, computed chunk by chunk (in worker
    processes when that pays)."""
    planes = len(z_um)
    if model == "vectorial":
        return _vectorial_bank_planes(z_um, nx, depth_um, kwargs)
    if workers is None:
        workers = available_cores() if planes * nx >= _PARALLEL_MIN_PLANE_PX else 1
    chunk = planes_per_chunk(nx, planes, workers)
    starts = range(0, planes, chunk)
    workers = max(1, min(workers, len(starts)))
    log.info(
        kv(
            "psf_bank_computing",
            model=model,
            planes=planes,
            size_px=nx,
            bank_mb=f"{planes * (nx // 2 + 1) ** 2 * 4 / 2**20:.0f}",
            planes_per_chunk=chunk,
            workers=workers,
        )
    )
    psf = np.empty((planes, nx // 2 + 1, nx // 2 + 1), dtype=np.float32)
    with tqdm(total=planes, desc=f"PSF bank, {nx}x{nx} px", unit="plane", mininterval=1.0) as bar:
        if workers == 1:
            for start in starts:
                block = _normalised_planes(z_um[start : start + chunk], nx, depth_um, kwargs, model)
                psf[start : start + len(block)] = block
                bar.update(len(block))
            return psf
        # spawn: a fresh interpreter per worker, safe beside the daemon's threads and the same on every OS
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {
                pool.submit(_normalised_planes, z_um[start : start + chunk], nx, depth_um, kwargs, model): start
                for start in starts
            }
            for future in as_completed(futures):
                # popped, so that each chunk's memory is freed once copied instead of when the pool closes
                start = futures.pop(future)
                block = future.result()
                psf[start : start + len(block)] = block
                bar.update(len(block))
                del future, block
    return psf


def _cache_key(optics: OpticsConfig, params: dict[str, object]) -> str:
    blob = json.dumps(
        {
            "optics": optics.model_dump(mode="json"),
            **params,
            "psfmodels": importlib.metadata.version("psfmodels"),
            "v": _CACHE_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def compute_psf_bank(
    optics: OpticsConfig,
    *,
    max_defocus_um: float,
    z_step_um: float,
    depth_um: float,
    model: PsfModel = "vectorial",
    workers: int | None = None,
) -> PsfBank:
    """Compute the bank over [-max_defocus_um, +max_defocus_um] (stage um) for a point at `depth_um`.

    `workers`: processes computing planes; None takes every available core for a bank large enough to gain from
    them, else computes in this process.
    """
    pixel_size_um = optics.pixel_size_um
    nx = psf_size_px(optics, max_defocus_um, pixel_size_um)
    kwargs = psf_parameters(optics, pixel_size_um)
    count = round(max_defocus_um / z_step_um)
    defocus_um = np.arange(-count, count + 1, dtype=np.float64) * z_step_um
    depth_step_um = 2.0
    z_best = best_focus_z(depth_um, kwargs, model)
    z_deeper = best_focus_z(depth_um + depth_step_um, kwargs, model)
    # stage position of best focus is z - zp (1 - ni/ns) (see module docstring); its slope over depth
    paraxial_offset = 1.0 - optics.immersion_index / optics.sample_index
    stage_per_sample = (z_deeper - z_best) / depth_step_um - paraxial_offset
    quadrants = _compute_planes(z_best + defocus_um, nx, depth_um, kwargs, model, workers)
    key = _cache_key(optics, _bank_params(max_defocus_um, z_step_um, depth_um, model))
    return PsfBank(
        defocus_um=defocus_um,
        psf_quadrant=quadrants,
        pixel_size_um=pixel_size_um,
        depth_um=float(depth_um),
        stage_um_per_sample_um=float(stage_per_sample),
        model=model,
        key=key,
    )


def _bank_params(max_defocus_um: float, z_step_um: float, depth_um: float, model: str) -> dict[str, object]:
    return {
        "max_defocus_um": float(max_defocus_um),
        "z_step_um": float(z_step_um),
        "depth_um": round(float(depth_um), 6),
        "model": model,
    }


def load_or_compute_psf_bank(
    optics: OpticsConfig,
    *,
    max_defocus_um: float,
    z_step_um: float,
    depth_um: float,
    cache_dir: Path | None = None,
    model: PsfModel = "vectorial",
    workers: int | None = None,
) -> tuple[PsfBank, bool]:
    """The bank from the on-disk cache when present, else computed and stored. Returns (bank, loaded_from_cache).

    The cache file name is a hash of the optics, the grid, the model and the psfmodels version, so a change to
    any of them computes a new bank instead of reusing a stale one. A damaged cache file is recomputed.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    params = _bank_params(max_defocus_um, z_step_um, depth_um, model)
    key = _cache_key(optics, params)
    path = directory / f"psf-bank-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                bank = PsfBank(
                    defocus_um=data["defocus_um"],
                    psf_quadrant=data["psf_quadrant"],
                    pixel_size_um=float(data["pixel_size_um"]),
                    depth_um=float(data["depth_um"]),
                    stage_um_per_sample_um=float(data["stage_um_per_sample_um"]),
                    model=str(data["model"]),
                    key=key,
                )
            log.debug(kv("psf_bank_loaded", path=path))
            return bank, True
        except (OSError, KeyError, ValueError) as exc:
            log.warning(kv("psf_bank_cache_unreadable", path=path, error=exc))
    start = time.perf_counter()
    bank = compute_psf_bank(
        optics,
        max_defocus_um=max_defocus_um,
        z_step_um=z_step_um,
        depth_um=depth_um,
        model=model,
        workers=workers,
    )
    log.info(
        kv(
            "psf_bank_computed",
            model=model,
            planes=len(bank.defocus_um),
            size_px=bank.size_px,
            seconds=f"{time.perf_counter() - start:.1f}",
            stage_um_per_sample_um=f"{bank.stage_um_per_sample_um:.3f}",
        )
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
            np.savez(
                handle,
                defocus_um=bank.defocus_um,
                psf_quadrant=bank.psf_quadrant,
                pixel_size_um=bank.pixel_size_um,
                depth_um=bank.depth_um,
                stage_um_per_sample_um=bank.stage_um_per_sample_um,
                model=bank.model,
            )
        os.replace(handle.name, path)  # atomic: concurrent starts never read a half-written bank
    except OSError as exc:
        log.warning(kv("psf_bank_cache_not_written", path=path, error=exc))
    return bank, False


class OtfCache:
    """Real transfer functions of bank planes on an rfft2 grid, computed on demand and kept in an LRU cache.

    The PSFs are even in x and y (radially symmetric, centred), so their transfer function is real and even:
    H(u, v) = sum_xy psf(x, y) cos(2 pi u x / P) cos(2 pi v y / Q). We evaluate it as two small matrix products on
    the folded PSF (the bank's quadrant with its off-axis rows and columns doubled, made per plane when first
    needed), which is several times cheaper than an FFT of the PSF zero-padded to the frame, and only over the
    low-frequency block where the plane's transfer function is non-negligible (`cutoff_index`): strongly defocused
    planes carry no high frequencies, so their multiply-add touches a small corner of the spectrum.
    """

    def __init__(
        self,
        bank: PsfBank,
        *,
        max_bytes: int = 512 * 2**20,
        rel_tolerance: float = 1e-4,
    ) -> None:
        self.bank = bank
        self.max_bytes = max_bytes
        self._cutoff_cycles = self._cutoffs(rel_tolerance)
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._bytes = 0

    def _cutoffs(self, rel_tolerance: float) -> np.ndarray:
        """Per plane, the spatial frequency (cycles/px) beyond which |H| < rel_tolerance * H(0) everywhere."""
        size = 2 * self.bank.size_px
        fy = np.fft.fftfreq(size)[:, None]
        fx = np.fft.rfftfreq(size)[None, :]
        radius = np.sqrt(fx**2 + fy**2)
        cutoffs = np.empty(len(self.bank.defocus_um))
        workers = available_cores()
        for i in range(len(cutoffs)):
            spectrum = np.abs(scipy.fft.rfft2(self.bank.plane(i), s=(size, size), workers=workers))
            significant = spectrum > rel_tolerance * spectrum[0, 0]
            cutoffs[i] = radius[significant].max() + 1.0 / size
        return np.minimum(cutoffs, 1.0)

    def block_size(self, index: int, fft_shape: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns (from frequency 0) of the non-negligible quarter of plane `index` on this grid."""
        rows = min(
            fft_shape[0] // 2 + 1,
            math.ceil(self._cutoff_cycles[index] * fft_shape[0]) + 1,
        )
        cols = min(
            fft_shape[1] // 2 + 1,
            math.ceil(self._cutoff_cycles[index] * fft_shape[1]) + 1,
        )
        return rows, cols

    def quarter(self, index: int, fft_shape: tuple[int, int]) -> np.ndarray:
        """H(u, v) for u = 0..rows-1, v = 0..cols-1 (float32), from `block_size`."""
        key = (int(index), int(fft_shape[0]), int(fft_shape[1]))
        cached = self._cache.pop(key, None)
        if cached is None:
            rows, cols = self.block_size(index, fft_shape)
            folded = self.bank.psf_quadrant[index].astype(np.float64)  # row 0 / column 0 are the axes
            folded[1:, :] *= 2.0
            folded[:, 1:] *= 2.0
            taps = np.arange(folded.shape[-1])
            cos_y = np.cos(2.0 * np.pi * np.outer(np.arange(rows), taps) / fft_shape[0])
            cos_x = np.cos(2.0 * np.pi * np.outer(np.arange(cols), taps) / fft_shape[1])
            cached = (cos_y @ folded @ cos_x.T).astype(np.float32)
            self._bytes += cached.nbytes
            while self._bytes > self.max_bytes and self._cache:
                oldest = next(iter(self._cache))
                self._bytes -= self._cache.pop(oldest).nbytes
        self._cache[key] = cached
        return cached
