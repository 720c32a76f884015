"""Specimen families other than nuclei: cytoplasm, membranes, filaments, puncta, beads, and mixtures.

A network trained on one procedural specimen learns that specimen. These families give training (and held-out
evaluation) specimens of other shapes, textures and depth structure, on the same voxel grid as `Specimen`:
float32 planes [K, H, W] of photons per voxel, periodic in y and x (filters wrap, coordinates are taken modulo the
field), with `plane_z_um` relative to the specimen mid-plane and the lowest structures resting on the coverslip.

Each family is a few lines of geometry with textures from smoothed noise; the brightness scale follows
`SpecimenConfig.photons_per_um3` so a family's mean signal is of the order of the nuclei's.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from acquire_refocus.config import SpecimenConfig

# Cells per mm^2 of the cytoplasm and membrane families at density factor 1 (a sub-confluent culture).
CELLS_PER_MM2 = 1200.0
PUNCTA_PER_MM2 = 40_000.0
BEADS_PER_MM2 = 20_000.0
FILAMENTS_PER_MM2 = 6_000.0


class FamilyGrid:
    """The voxel grid a family draws on: field shape, pixel size, plane depths, and the photon scale."""

    def __init__(
        self, config: SpecimenConfig, pixel_size_um: float, field_shape_px: tuple[int, int], plane_z_um: np.ndarray
    ) -> None:
        self.config = config
        self.pixel_size_um = float(pixel_size_um)
        self.shape_px = field_shape_px
        self.plane_z_um = plane_z_um
        self.photons_per_voxel = config.photons_per_um3 * pixel_size_um * pixel_size_um * config.z_step_um

    @property
    def field_um(self) -> tuple[float, float]:
        return (self.shape_px[0] * self.pixel_size_um, self.shape_px[1] * self.pixel_size_um)

    @property
    def area_mm2(self) -> float:
        height_um, width_um = self.field_um
        return height_um * width_um / 1e6

    @property
    def bottom_um(self) -> float:
        """Depth of the coverslip surface relative to the mid-plane (the lowest plane)."""
        return float(self.plane_z_um[0])

    def empty(self) -> np.ndarray:
        return np.zeros((len(self.plane_z_um), *self.shape_px), dtype=np.float32)

    def smooth_noise(self, rng: np.random.Generator, sigma_um: float, planes: int | None = None) -> np.ndarray:
        """Zero-mean, unit-std periodic noise smoothed over `sigma_um` laterally ([H, W], or [planes, H, W])."""
        shape = self.shape_px if planes is None else (planes, *self.shape_px)
        sigma_px = sigma_um / self.pixel_size_um
        sigma = sigma_px if planes is None else (0.8, sigma_px, sigma_px)
        noise: np.ndarray = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
        scaled: np.ndarray = noise / (noise.std() + 1e-9)
        return scaled

    def splat(
        self, volume: np.ndarray, z_um: np.ndarray, y_um: np.ndarray, x_um: np.ndarray, weight: np.ndarray
    ) -> None:
        """Add point sources (linear in z between planes, nearest pixel in y and x), wrapping in y and x."""
        height, width = self.shape_px
        rows = np.floor(y_um / self.pixel_size_um).astype(np.int64) % height
        cols = np.floor(x_um / self.pixel_size_um).astype(np.int64) % width
        step = self.config.z_step_um
        position = np.clip((z_um - self.plane_z_um[0]) / step, 0.0, len(self.plane_z_um) - 1.000001)
        lower = np.floor(position).astype(np.int64)
        upper_share = (position - lower).astype(np.float32)
        np.add.at(volume, (lower, rows, cols), weight * (1.0 - upper_share))
        np.add.at(volume, (np.minimum(lower + 1, len(self.plane_z_um) - 1), rows, cols), weight * upper_share)


def _voronoi_cells(grid: FamilyGrid, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Periodic Voronoi cells over the field: (cell index [H, W], distance to own seed [H, W] um, distance to the
    nearest boundary [H, W] um, approximated as half the gap between the two nearest seeds)."""
    height_um, width_um = grid.field_um
    seeds = np.column_stack([rng.uniform(0, height_um, count), rng.uniform(0, width_um, count)])
    tree = cKDTree(seeds, boxsize=(height_um, width_um))
    px = grid.pixel_size_um
    ys, xs = np.meshgrid(
        (np.arange(grid.shape_px[0]) + 0.5) * px, (np.arange(grid.shape_px[1]) + 0.5) * px, indexing="ij"
    )
    points = np.column_stack([ys.ravel() % height_um, xs.ravel() % width_um])
    distances, indices = tree.query(points, k=2)
    shape = grid.shape_px
    return (
        indices[:, 0].reshape(shape),
        distances[:, 0].reshape(shape),
        (0.5 * (distances[:, 1] - distances[:, 0])).reshape(shape),
    )


def _cell_count(grid: FamilyGrid, per_mm2: float, rng: np.random.Generator) -> int:
    return max(2, int(rng.poisson(per_mm2 * grid.config.nuclei_per_mm2 / 1500.0 * grid.area_mm2)))


def cytoplasm(grid: FamilyGrid, rng: np.random.Generator) -> np.ndarray:
    """Spread cells filled with a cytoplasmic stain: dome-shaped, textured, a dark nucleus off-centre."""
    count = _cell_count(grid, CELLS_PER_MM2, rng)
    cell, to_seed_um, to_edge_um = _voronoi_cells(grid, count, rng)
    radius_um = to_seed_um + to_edge_um  # seed-to-boundary distance through this pixel
    t = np.clip(to_seed_um / np.maximum(radius_um, 1e-6), 0.0, 1.0)
    cell_height_um = rng.uniform(3.0, 9.0, count)[cell] * (1.0 + 0.15 * grid.smooth_noise(rng, 4.0))
    height_um = np.clip(cell_height_um * np.sqrt(np.clip(1.0 - t**2, 0.0, 1.0)) + 0.5, 0.5, None)
    brightness = rng.lognormal(0.0, 0.4, count)[cell] * np.clip(1.0 + 0.35 * grid.smooth_noise(rng, 1.2), 0.2, None)
    # a dark nucleus: an ellipse-like hole around a point near each seed (t small), fading towards the edge
    nucleus = np.clip((t - rng.uniform(0.25, 0.45)) / 0.08, 0.0, 1.0)
    density = brightness * (0.15 + 0.85 * nucleus) * np.clip(to_edge_um / 0.6, 0.0, 1.0)
    volume = grid.empty()
    base_um = grid.bottom_um + rng.uniform(0.0, grid.config.layer_thickness_um, count)[cell]
    for k, z_um in enumerate(grid.plane_z_um):
        inside = (z_um >= base_um) & (z_um <= base_um + height_um)
        texture = np.clip(1.0 + 0.5 * grid.smooth_noise(rng, 0.5), 0.1, None)
        volume[k] = np.where(inside, density * texture, 0.0)
    return (0.5 * grid.photons_per_voxel * volume).astype(np.float32)


def membranes(grid: FamilyGrid, rng: np.random.Generator) -> np.ndarray:
    """Cell membranes of an epithelium-like layer: thin walls between cells of varied height, and their tops."""
    count = _cell_count(grid, CELLS_PER_MM2 * 1.5, rng)
    cell, _, to_edge_um = _voronoi_cells(grid, count, rng)
    wall_um = 0.25
    wall = np.exp(-0.5 * (to_edge_um / wall_um) ** 2) * np.clip(1.0 + 0.3 * grid.smooth_noise(rng, 1.0), 0.2, None)
    base_um = grid.bottom_um + rng.uniform(0.0, 0.3 * grid.config.layer_thickness_um + 0.5, count)[cell]
    top_um = base_um + rng.uniform(4.0, 10.0, count)[cell]
    volume = grid.empty()
    step = grid.config.z_step_um
    for k, z_um in enumerate(grid.plane_z_um):
        inside = (z_um >= base_um) & (z_um <= top_um)
        apical = np.exp(-0.5 * ((z_um - top_um) / (0.6 * step)) ** 2) * 0.35
        volume[k] = np.where(inside, wall, 0.0) + apical
    return (2.0 * grid.photons_per_voxel * volume).astype(np.float32)


def filaments(grid: FamilyGrid, rng: np.random.Generator) -> np.ndarray:
    """Cytoskeletal filaments: persistent random walks, mostly in plane, some bundled (brighter)."""
    count = max(1, int(rng.poisson(FILAMENTS_PER_MM2 * grid.config.nuclei_per_mm2 / 1500.0 * grid.area_mm2)))
    step_um = 0.5 * grid.pixel_size_um
    points_z, points_y, points_x, weights = [], [], [], []
    height_um, width_um = grid.field_um
    for _ in range(count):
        length_um = rng.uniform(15.0, 80.0)
        steps = int(length_um / step_um)
        heading = rng.uniform(0.0, 2 * math.pi) + np.cumsum(rng.normal(0.0, step_um / 6.0, steps))
        slope = rng.normal(0.0, 0.04)
        y = rng.uniform(0.0, height_um) + np.cumsum(np.sin(heading)) * step_um
        x = rng.uniform(0.0, width_um) + np.cumsum(np.cos(heading)) * step_um
        z = grid.bottom_um + rng.uniform(0.5, grid.config.layer_thickness_um + 1.5) + slope * np.arange(steps) * step_um
        points_z.append(z)
        points_y.append(y)
        points_x.append(x)
        weights.append(np.full(steps, rng.lognormal(0.0, 0.5) * (3.0 if rng.random() < 0.2 else 1.0), np.float32))
    volume = grid.empty()
    grid.splat(
        volume, np.concatenate(points_z), np.concatenate(points_y), np.concatenate(points_x), np.concatenate(weights)
    )
    width_px = 0.15 / grid.pixel_size_um + 0.3
    blurred: np.ndarray = ndimage.gaussian_filter(volume, (0.4, width_px, width_px), mode="wrap")
    return np.asarray(grid.photons_per_voxel * 0.2 * blurred / (blurred.mean() + 1e-9), dtype=np.float32)


def puncta(grid: FamilyGrid, rng: np.random.Generator) -> np.ndarray:
    """Vesicles and foci: diffraction-limited to ~1 um spots scattered through the layer, some clustered."""
    count = max(1, int(rng.poisson(PUNCTA_PER_MM2 * grid.config.nuclei_per_mm2 / 1500.0 * grid.area_mm2)))
    height_um, width_um = grid.field_um
    y = rng.uniform(0.0, height_um, count)
    x = rng.uniform(0.0, width_um, count)
    clustered = rng.random(count) < 0.4
    anchors = rng.integers(0, count, int(clustered.sum()))
    y[clustered] = y[anchors] + rng.normal(0.0, 3.0, len(anchors))
    x[clustered] = x[anchors] + rng.normal(0.0, 3.0, len(anchors))
    z = grid.bottom_um + rng.uniform(0.3, grid.config.layer_thickness_um + 3.0, count)
    weight = rng.lognormal(0.0, 0.6, count).astype(np.float32)
    volume = grid.empty()
    small = rng.random(count) < 0.7
    for chosen, sigma_um in ((small, 0.12), (~small, 0.4)):
        layer = grid.empty()
        grid.splat(layer, z[chosen], y[chosen], x[chosen], weight[chosen])
        width_px = sigma_um / grid.pixel_size_um + 0.3
        blurred: np.ndarray = ndimage.gaussian_filter(layer, (0.5, width_px, width_px), mode="wrap")
        volume += blurred
    return np.asarray(grid.photons_per_voxel * 0.2 * volume / (volume.mean() + 1e-9), dtype=np.float32)


def beads(grid: FamilyGrid, rng: np.random.Generator) -> np.ndarray:
    """Sub-resolution beads (~100 nm) in the mid-plane only: the one specimen thinner than any depth of field, as
    on a bead slide. Every other family spreads over um in z, so at high NA some structure is in focus wherever the
    stage is; in a frame of beads the blur alone tells how far the plane is (the PSF's rings grow with |d|). The
    mid-plane lies a few um deep in the medium (the grid's half-depth), so an oil objective imaging into water sees
    the spherical aberration of that depth, which beads dried on the coverslip would not have."""
    count = max(1, int(rng.poisson(BEADS_PER_MM2 * grid.config.nuclei_per_mm2 / 1500.0 * grid.area_mm2)))
    height_um, width_um = grid.field_um
    volume = grid.empty()
    grid.splat(
        volume,
        np.zeros(count),
        rng.uniform(0.0, height_um, count),
        rng.uniform(0.0, width_um, count),
        rng.lognormal(0.0, 0.2, count).astype(np.float32),
    )
    width_px = 0.05 / grid.pixel_size_um  # the bead's own radius, under any pixel of these optics
    blurred: np.ndarray = ndimage.gaussian_filter(volume, (0.0, width_px, width_px), mode="wrap")
    return np.asarray(grid.photons_per_voxel * 0.2 * blurred / (blurred.mean() + 1e-9), dtype=np.float32)


FAMILIES = {
    "cytoplasm": cytoplasm,
    "membranes": membranes,
    "filaments": filaments,
    "puncta": puncta,
    "beads": beads,
}


def rasterise_family(
    family: str, grid: FamilyGrid, rng: np.random.Generator, nuclei_planes: np.ndarray | None = None
) -> np.ndarray:
    """Planes of `family`; 'mixture' adds one other family (drawn) to the nuclei planes at a drawn weight."""
    if family == "mixture":
        if nuclei_planes is None:
            raise ValueError("a mixture needs the nuclei planes")
        other = str(rng.choice(["cytoplasm", "filaments", "puncta"]))
        return nuclei_planes + float(rng.uniform(0.3, 1.5)) * FAMILIES[other](grid, rng)
    return FAMILIES[family](grid, rng)
