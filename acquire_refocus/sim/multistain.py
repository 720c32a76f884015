"""A second stain of the same simulated cells: cytoplasm with bright puncta, at its own wavelength and brightness.

Why: a real time-lapse images a nuclear stain beside other labels, and the focus loop must use one channel's
frames only. The cytoplasm is built from the nuclei of the nuclear specimen (same seed, same cells): a cell body
around each nucleus (the nuclear mask blurred by a cell radius, over the same planes), dim inside the nucleus,
with a fibrous texture and diffraction-limited puncta (vesicles) scattered through it. Its frames are rendered
with a PSF bank for the channel's own emission wavelength, and its sharpness peaks at another Z than the
nuclei's where the structures lie at other depths, which is what pooling channels gets wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from acquire_refocus.config import OpticsConfig, SimChannelConfig, SimulatorConfig
from acquire_refocus.sim.microscope import SimulatedMicroscope
from acquire_refocus.sim.specimen import Specimen, specimen_for_optics

_CELL_RADIUS_UM = 6.0  # how far the cytoplasm reaches beyond a nucleus
_CYTOPLASM_LEVEL = 0.35  # cytoplasm emission per voxel relative to a nucleus's
_NUCLEAR_LEAK = 0.1  # what is left of the cytoplasmic stain inside a nucleus
_PUNCTA_PER_MM2 = 30_000.0
_PUNCTUM_SIGMA_UM = 0.25
_PUNCTUM_PHOTONS = 8.0  # photons per punctum relative to one nuclear voxel's


def cytoplasm_planes(nuclei: Specimen, seed: int) -> npt.NDArray[np.float32]:
    """float32 [K, H, W] photons per voxel: the cytoplasm and puncta of the cells whose nuclei are `nuclei`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC7A0]))
    voxel = nuclei.config.photons_per_um3 * nuclei.pixel_size_um**2 * nuclei.config.z_step_um
    nuclear = np.clip(nuclei.planes / (0.5 * voxel), 0.0, 1.0)
    radius_px = _CELL_RADIUS_UM / nuclei.pixel_size_um
    body = ndimage.gaussian_filter(nuclear, (1.0, radius_px / 2, radius_px / 2), mode="wrap")
    body = np.clip(body / (body.max() + 1e-12) * 6.0, 0.0, 1.0)
    fibres = ndimage.gaussian_filter(rng.standard_normal(nuclear.shape[1:]), 1.0 / nuclei.pixel_size_um, mode="wrap")
    texture = np.clip(1.0 + 0.5 * fibres / (fibres.std() + 1e-12), 0.2, None).astype(np.float32)
    planes = (_CYTOPLASM_LEVEL * voxel) * body * (1.0 - (1.0 - _NUCLEAR_LEAK) * nuclear) * texture[None]
    height, width = nuclear.shape[1:]
    area_mm2 = height * width * nuclei.pixel_size_um**2 / 1e6
    count = int(rng.poisson(_PUNCTA_PER_MM2 * area_mm2))
    rows, cols = rng.integers(0, height, count), rng.integers(0, width, count)
    planes_z = rng.integers(0, len(nuclei.plane_z_um), count)
    inside = body[planes_z, rows, cols] > 0.3  # puncta only where there is cytoplasm
    spots = np.zeros_like(planes)
    np.add.at(spots, (planes_z[inside], rows[inside], cols[inside]), _PUNCTUM_PHOTONS * voxel)
    sigma_px = _PUNCTUM_SIGMA_UM / nuclei.pixel_size_um
    spots = ndimage.gaussian_filter(spots, (0.0, sigma_px, sigma_px), mode="wrap")
    stained: npt.NDArray[np.float32] = (planes + spots).astype(np.float32)
    return stained


class StainMicroscope(SimulatedMicroscope):
    """The microscope seen through one channel: its stain's specimen, its wavelength's PSF bank, and the focus
    (drift, tilt) of `primary`, the microscope whose clock and drift every channel shares."""

    def __init__(
        self,
        optics: OpticsConfig,
        simulator: SimulatorConfig,
        channel: SimChannelConfig,
        primary: SimulatedMicroscope,
    ) -> None:
        specimen = Specimen(
            specimen_for_optics(simulator.specimen, optics), float(optics.pixel_size_um), seed=simulator.seed
        )
        if channel.stain == "cytoplasm":
            specimen.planes = cytoplasm_planes(specimen, simulator.seed)
        if channel.brightness != 1.0:
            specimen.planes *= np.float32(channel.brightness)
        super().__init__(optics, simulator, specimen)
        self._primary = primary
        self.stain = channel.stain

    def focus_z_um(self, stage_xy_um: Sequence[float] = (0.0, 0.0), t_s: float = 0.0) -> float:
        return self._primary.focus_z_um(stage_xy_um, t_s)


def stain_microscopes(
    optics: OpticsConfig, simulator: SimulatorConfig, primary: SimulatedMicroscope
) -> dict[str, SimulatedMicroscope]:
    """Channel name -> the microscope that renders it. A nuclear channel at the primary's wavelength and
    brightness is the primary itself (no second specimen or PSF bank)."""
    scopes: dict[str, SimulatedMicroscope] = {}
    for name, channel in simulator.channels.items():
        channel_optics = optics.for_channel(name)
        same = (
            channel.stain == "nuclei"
            and channel.brightness == 1.0
            and math.isclose(channel_optics.emission_wavelength_nm, primary.optics.emission_wavelength_nm)
        )
        scopes[name] = primary if same else StainMicroscope(channel_optics, simulator, channel, primary)
    return scopes
