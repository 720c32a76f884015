"""Procedural Hoechst-stained nuclei (or another family, sim/families.py): a seeded, periodic 3-D field larger than
one camera frame.

The specimen is a monolayer of nuclei resting on the coverslip: textured ellipsoids of varied size, shape,
orientation and brightness; some in clusters, a few small and bright (mitotic or just divided, some as pairs);
a smooth random density map makes some regions sparse and others dense. It is stored as a stack of planes
(photons emitted per voxel per exposure) at the sample pixel size and `SpecimenConfig.z_step_um`, and is periodic
in x and y, so any stage position shows cells and moving the stage by the field size returns to the same cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from acquire_refocus.config import OpticsConfig, SpecimenConfig
from acquire_refocus.sim.families import FamilyGrid, rasterise_family

_EDGE_SOFTNESS_UM = 0.4  # width of the nuclear envelope's intensity fall-off


def collection_fraction(optics: OpticsConfig) -> float:
    """Fraction of an isotropic emitter's light inside the objective's acceptance cone in the sample: half-angle
    asin(NA / n_sample), a whole hemisphere when the NA exceeds the sample's index (oil into water)."""
    sin_half_angle = min(optics.numerical_aperture / optics.sample_index, 1.0)
    return (1.0 - math.sqrt(1.0 - sin_half_angle**2)) / 2.0


def specimen_for_optics(config: SpecimenConfig, optics: OpticsConfig) -> SpecimenConfig:
    """`config` with `photons_per_um3` (given as detected with the default 20x / 0.45 air optics) scaled by these
    optics' collection fraction: the same stained sample is about 17 times brighter per um^2 under a 1.4 NA oil
    objective, so that a 60x frame, whose pixels are 9 times smaller, is not a tenth as bright as a 20x one."""
    ratio = collection_fraction(optics) / collection_fraction(OpticsConfig())
    return config.model_copy(update={"photons_per_um3": config.photons_per_um3 * ratio})


@dataclass(frozen=True)
class Nucleus:
    """One nucleus: centre (um; z relative to the specimen mid-plane), semi-axes (um), rotation, brightness."""

    x_um: float
    y_um: float
    z_um: float
    semi_axes_um: tuple[float, float, float]
    angle_rad: float
    brightness: float
    mitotic: bool


class Specimen:
    """A seeded field of nuclei; `planes` is float32 [K, H, W] in photons per voxel, periodic in y and x."""

    def __init__(self, config: SpecimenConfig, pixel_size_um: float, seed: int) -> None:
        self.config = config
        self.pixel_size_um = float(pixel_size_um)
        self.seed = int(seed)
        height_px = max(16, round(config.field_size_um[1] / pixel_size_um))
        width_px = max(16, round(config.field_size_um[0] / pixel_size_um))
        self.field_shape_px = (height_px, width_px)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5EC1]))
        self.nuclei = _place_nuclei(config, (height_px * pixel_size_um, width_px * pixel_size_um), rng)
        half_extent_um = config.layer_thickness_um / 2 + config.nucleus_thickness_um[1] / 2
        half_planes = math.ceil(half_extent_um / config.z_step_um)
        self.plane_z_um = np.arange(-half_planes, half_planes + 1) * config.z_step_um
        # the lowest nuclei touch the coverslip: the mid-plane lies this deep in the sample
        self.depth_um = float(half_extent_um)
        if config.family == "nuclei":
            self.planes = self._rasterise(rng)
        else:
            grid = FamilyGrid(config, self.pixel_size_um, self.field_shape_px, self.plane_z_um)
            nuclei = self._rasterise(rng) if config.family == "mixture" else None
            if nuclei is None:
                self.nuclei = []
            self.planes = rasterise_family(config.family, grid, rng, nuclei)

    @property
    def mean_photons_per_px(self) -> float:
        return float(self.planes.sum(axis=0).mean())

    def window(self, top_px: int, left_px: int, height_px: int, width_px: int) -> np.ndarray:
        """Planes [K, height, width] whose pixel (0, 0) is field pixel (top, left), wrapping periodically."""
        rows = np.arange(top_px, top_px + height_px) % self.field_shape_px[0]
        cols = np.arange(left_px, left_px + width_px) % self.field_shape_px[1]
        return self.planes[:, rows[:, None], cols[None, :]]

    def _rasterise(self, rng: np.random.Generator) -> np.ndarray:
        height, width = self.field_shape_px
        planes = np.zeros((len(self.plane_z_um), height, width), dtype=np.float32)
        px = self.pixel_size_um
        voxel_um3 = px * px * self.config.z_step_um
        for nucleus in self.nuclei:
            a, b, c = nucleus.semi_axes_um
            reach_um = max(a, b) + 2 * _EDGE_SOFTNESS_UM
            cy, cx = nucleus.y_um / px, nucleus.x_um / px
            rows = np.arange(math.floor(cy - reach_um / px), math.ceil(cy + reach_um / px) + 1)
            cols = np.arange(math.floor(cx - reach_um / px), math.ceil(cx + reach_um / px) + 1)
            in_z = np.abs(self.plane_z_um - nucleus.z_um) < c + 2 * _EDGE_SOFTNESS_UM
            if not in_z.any():
                continue
            zs = (self.plane_z_um[in_z] - nucleus.z_um)[:, None, None]
            ys = ((rows + 0.5) * px - nucleus.y_um)[None, :, None]
            xs = ((cols + 0.5) * px - nucleus.x_um)[None, None, :]
            cos, sin = math.cos(nucleus.angle_rad), math.sin(nucleus.angle_rad)
            u = xs * cos + ys * sin
            v = -xs * sin + ys * cos
            radius = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (zs / c) ** 2)
            # soft envelope: the edge width is _EDGE_SOFTNESS_UM whatever the nucleus size
            edge = 0.5 * (1.0 - np.tanh((radius - 1.0) * min(a, b, c) / _EDGE_SOFTNESS_UM))
            density = edge * _chromatin(edge.shape, nucleus, px, rng)
            photons = (self.config.photons_per_um3 * voxel_um3 * nucleus.brightness) * density
            planes[np.ix_(np.flatnonzero(in_z), rows % height, cols % width)] += photons.astype(np.float32)
        return planes


def _chromatin(
    shape: tuple[int, ...],
    nucleus: Nucleus,
    pixel_size_um: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.float64]:
    """Multiplicative texture: mottled chromatin, bright chromocentres, dim nucleoli (condensed when mitotic)."""
    grain_px = (0.6, 0.5 / pixel_size_um, 0.5 / pixel_size_um)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), grain_px, mode="wrap")
    noise /= noise.std() + 1e-9
    contrast = 0.5 if nucleus.mitotic else 0.3
    texture: npt.NDArray[np.float64] = np.clip(1.0 + contrast * noise, 0.2, None)
    coarse = ndimage.gaussian_filter(
        rng.standard_normal(shape),
        (1.0, 1.6 / pixel_size_um, 1.6 / pixel_size_um),
        mode="wrap",
    )
    coarse /= coarse.std() + 1e-9
    if not nucleus.mitotic:
        # nucleoli: smooth dark patches; chromocentres: sparse bright spots
        texture *= np.clip(1.0 - 0.35 * np.clip(coarse - 0.8, 0.0, None), 0.4, 1.0)
        spots = np.clip(noise - 2.0, 0.0, None)
        texture += 1.5 * spots
    return texture


def _place_nuclei(config: SpecimenConfig, field_um: tuple[float, float], rng: np.random.Generator) -> list[Nucleus]:
    """Nucleus parameters: a smooth density map for sparse/dense regions, clusters, mitotic pairs."""
    height_um, width_um = field_um
    count = int(rng.poisson(config.nuclei_per_mm2 * height_um * width_um / 1e6))
    if count == 0:
        return []
    # density map on a coarse periodic grid: exp of smooth noise gives sparse and dense regions
    grid = 32
    density = ndimage.gaussian_filter(rng.standard_normal((grid, grid)), 3.0, mode="wrap")
    density = np.exp(1.2 * density / (density.std() + 1e-9))
    density /= density.sum()
    cells = rng.choice(grid * grid, size=count, p=density.ravel())
    ys = (cells // grid + rng.random(count)) * height_um / grid
    xs = (cells % grid + rng.random(count)) * width_um / grid
    mean_diameter = float(np.mean(config.nucleus_diameter_um))
    clustered = rng.random(count) < config.cluster_fraction
    n_clusters = max(1, int(clustered.sum() // 6))
    centres = rng.integers(0, count, size=n_clusters)
    for member in np.flatnonzero(clustered):
        centre = centres[rng.integers(n_clusters)]
        ys[member] = ys[centre] + rng.normal(0.0, 0.9 * mean_diameter)
        xs[member] = xs[centre] + rng.normal(0.0, 0.9 * mean_diameter)
    nuclei: list[Nucleus] = []
    half_layer = config.layer_thickness_um / 2
    for i in range(count):
        mitotic = bool(rng.random() < config.bright_fraction)
        diameter = rng.uniform(*config.nucleus_diameter_um)
        thickness = rng.uniform(*config.nucleus_thickness_um)
        aspect = rng.uniform(0.65, 1.0)
        brightness = float(rng.lognormal(0.0, 0.25))
        if mitotic:
            diameter *= 0.6
            thickness *= 0.8
            brightness *= rng.uniform(2.0, 3.5)
        z = rng.uniform(-half_layer, half_layer)
        angle = rng.uniform(0.0, math.pi)
        axes = (diameter / 2, diameter * aspect / 2, thickness / 2)
        y, x = ys[i] % height_um, xs[i] % width_um
        if mitotic and rng.random() < 0.5:
            # a dividing pair: two daughter nuclei along the division axis
            offset = 0.5 * diameter + rng.uniform(0.5, 2.0)
            dx, dy = math.cos(angle) * offset, math.sin(angle) * offset
            small = (axes[0] * 0.8, axes[1] * 0.8, axes[2])
            nuclei.append(
                Nucleus(
                    (x + dx) % width_um,
                    (y + dy) % height_um,
                    z,
                    small,
                    angle,
                    brightness,
                    True,
                )
            )
            nuclei.append(
                Nucleus(
                    (x - dx) % width_um,
                    (y - dy) % height_um,
                    z,
                    small,
                    angle,
                    brightness,
                    True,
                )
            )
            continue
        nuclei.append(Nucleus(float(x), float(y), float(z), axes, float(angle), brightness, mitotic))
    return nuclei
