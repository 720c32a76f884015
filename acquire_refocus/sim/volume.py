"""A specimen given as a volume: what the microscope needs of any specimen, and a real 2-D image made 3-D.

`SpecimenVolume` is the Protocol the simulated microscope renders from (the procedural `Specimen` satisfies it).
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
