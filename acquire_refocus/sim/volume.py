"""A specimen given as a volume: what the microscope needs of any specimen, a real 2-D image made 3-D, and a real
3-D volume.

`SpecimenVolume` is the Protocol the simulated microscope renders from (the procedural `Specimen` satisfies it).
`MeasuredVolume` takes a real fluorescence z-stack (e.g. a confocal one, whose PSF is far narrower than a
widefield objective's) as the specimen itself: structure real in x, y and z.
`ExtrudedImage` turns a real in-focus fluorescence image and its nucleus labels into a 3-D volume: each labelled
nucleus keeps its real outline and chromatin texture in x and y and gets a dome-shaped thickness in z
(half its equivalent diameter at the centre), at a random depth within a layer. The z structure is modelled; the
lateral structure is real. The summed projection of the volume equals the (background-subtracted) image.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from scipy import ndimage


class SpecimenVolume(Protocol):
    planes: np.ndarray  # float32 [K, H, W], photons per voxel, periodic in y and x
    plane_z_um: np.ndarray  # [K], depth of each plane relative to the mid-plane
    depth_um: float  # depth of the mid-plane below the coverslip
    field_shape_px: tuple[int, int]
    pixel_size_um: float

    def window(self, top_px: int, left_px: int, height_px: int, width_px: int) -> np.ndarray: ...


class ExtrudedImage:
    """A real 2-D nuclei image with its labels, extruded to a 3-D volume (see the module docstring)."""

    def __init__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        pixel_size_um: float,
        *,
        z_step_um: float = 1.0,
        layer_thickness_um: float = 4.0,
        seed: int = 0,
    ) -> None:
        if image.shape != labels.shape or image.ndim != 2:
            raise ValueError(f"image {image.shape} and labels {labels.shape} must be one 2-D shape")
        self.pixel_size_um = float(pixel_size_um)
        self.field_shape_px = (int(image.shape[0]), int(image.shape[1]))
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE1]))
        signal = (
            image.astype(np.float32) - float(np.percentile(image[labels == 0], 50))
            if (labels == 0).any()
            else image.astype(np.float32)
        )
        signal = np.clip(signal, 0.0, None)
        ids = np.unique(labels[labels > 0])
        areas = ndimage.sum_labels(np.ones_like(labels), labels, ids)
        diameter_um = 2.0 * np.sqrt(areas / math.pi) * self.pixel_size_um
        half_thickness_um = np.zeros(int(labels.max()) + 1)
        half_thickness_um[ids] = 0.25 * diameter_um
        centre_um = np.zeros(int(labels.max()) + 1)
        centre_um[ids] = rng.uniform(-layer_thickness_um / 2, layer_thickness_um / 2, len(ids))
        # each nucleus' own distance to its edge, scaled to 1 at its deepest pixel
        inner = labels > 0
        inner &= ndimage.grey_erosion(labels, size=3) == ndimage.grey_dilation(labels, size=3)
        edt = ndimage.distance_transform_edt(inner)
        peak = np.zeros(int(labels.max()) + 1)
        peak[ids] = ndimage.maximum(edt, labels, ids)
        profile = np.sqrt(np.clip(edt / np.maximum(peak[labels], 1e-6), 0.0, 1.0))
        profile = np.maximum(profile, 0.25) * (labels > 0)
        half_um = half_thickness_um[labels] * profile
        half_extent_um = layer_thickness_um / 2 + float(half_thickness_um.max()) + z_step_um
        count = math.ceil(half_extent_um / z_step_um)
        self.plane_z_um = np.arange(-count, count + 1) * z_step_um
        self.depth_um = float(half_extent_um)
        z_um = self.plane_z_um[:, None, None]
        inside = np.abs(z_um - centre_um[labels][None]) <= np.maximum(half_um, 0.5 * z_step_um)[None]
        inside &= (labels > 0)[None]
        layers = np.maximum(inside.sum(axis=0), 1)
        # nuclei carry their signal through their thickness; the background stays in the mid-plane
        self.planes = (inside * (signal * (labels > 0) / layers)[None]).astype(np.float32)
        self.planes[count] += signal * (labels == 0)

    def window(self, top_px: int, left_px: int, height_px: int, width_px: int) -> np.ndarray:
        rows = np.arange(top_px, top_px + height_px) % self.field_shape_px[0]
        cols = np.arange(left_px, left_px + width_px) % self.field_shape_px[1]
        window: np.ndarray = self.planes[:, rows[:, None], cols[None, :]]
        return window


class MeasuredVolume:
    """A real fluorescence z-stack (ZYX) as a specimen, resampled to the microscope's pixel size.

    Background (the median of the dimmest tenth of the planes, which a stack bracketing the specimen holds) and its
    noise (2 MADs of those planes) are subtracted, so empty voxels add no haze of rectified camera noise. Planes are
    summed in groups up to `max_z_step_um` (photons kept), and their depths are measured from the signal's
    intensity-weighted centre, which is the plane the stack's "in focus" refers to. The field is read mirrored in y
    and x (`field_shape_px` is 2H x 2W), which makes it periodic without seams, as the renderer's windows need;
    `planes` holds only the H x W that is not a mirror image (`unique_shape_px`; the cells3d stack at the 100x
    preset's 0.13 um pixels: 60 planes of 512 px, 63 MB, which a stored mirror would make four times as large).
    """

    def __init__(
        self,
        stack: np.ndarray,
        voxel_size_um: tuple[float, float, float],
        pixel_size_um: float,
        *,
        max_z_step_um: float,
    ) -> None:
        if stack.ndim != 3 or min(stack.shape) < 2:
            raise ValueError(f"a z-stack must be 3-D (z, y, x) with 2 or more voxels on each axis, got {stack.shape}")
        z_um, y_um, x_um = (float(v) for v in voxel_size_um)
        if not all(math.isfinite(v) and v > 0 for v in (z_um, y_um, x_um, pixel_size_um, max_z_step_um)):
            raise ValueError("voxel sizes, pixel size and max_z_step_um must be positive micrometres")
        volume = stack.astype(np.float32)
        plane_means = volume.mean(axis=(1, 2))
        dimmest = volume[np.argsort(plane_means)[: max(1, len(plane_means) // 10)]]
        background = float(np.median(dimmest))
        noise = 1.4826 * float(np.median(np.abs(dimmest - background)))
        volume = np.clip(volume - (background + 2.0 * noise), 0.0, None)
        group = max(1, int(max_z_step_um // z_um))
        planes = volume[: volume.shape[0] // group * group].reshape(-1, group, *volume.shape[1:]).sum(axis=1)
        zoom = (y_um / pixel_size_um, x_um / pixel_size_um)
        # interpolated plane by plane, then scaled by the pixels' area ratio, so that photons per um^2 are kept
        resampled = ndimage.zoom(planes, (1.0, *zoom), order=1, grid_mode=True, mode="grid-mirror")
        resampled = np.clip(resampled, 0.0, None) / np.float32(zoom[0] * zoom[1])
        step_um = group * z_um
        weights = resampled.sum(axis=(1, 2))
        centre = float((weights * np.arange(len(weights))).sum() / max(float(weights.sum()), 1e-12))
        self.plane_z_um = (np.arange(len(weights)) - centre) * step_um
        self.depth_um = float(np.abs(self.plane_z_um).max() + step_um)
        self.pixel_size_um = float(pixel_size_um)
        self.planes = np.ascontiguousarray(resampled, np.float32)
        self.unique_shape_px = (int(resampled.shape[1]), int(resampled.shape[2]))
        self.field_shape_px = (2 * self.unique_shape_px[0], 2 * self.unique_shape_px[1])

    def window(self, top_px: int, left_px: int, height_px: int, width_px: int) -> np.ndarray:
        rows = _mirrored(np.arange(top_px, top_px + height_px), self.unique_shape_px[0])
        cols = _mirrored(np.arange(left_px, left_px + width_px), self.unique_shape_px[1])
        window: np.ndarray = self.planes[:, rows[:, None], cols[None, :]]
        return window


def _mirrored(index: np.ndarray, size: int) -> np.ndarray:
    """Indices into a field of `size` read as the periodic field [field, field reversed] of period 2 x size."""
    folded: np.ndarray = index % (2 * size)
    return np.where(folded < size, folded, 2 * size - 1 - folded)
