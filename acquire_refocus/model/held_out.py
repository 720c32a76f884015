"""The held-out test set of the evaluation: simulated specimens never used for training or validation.

Specimens with seeds from TEST_SEED_BASE, several fields of view each, rendered at fixed signed defocus distances
with camera noise, plus an unseen setting: the same kind of frames from a *tilted* sample (the defocus varies across
the frame; the network never saw tilt in training). The ground truth is the noiseless in-focus image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from acquire_refocus.config import AppConfig, replace
from acquire_refocus.logs import kv
from acquire_refocus.model.data import TEST_SEED_BASE, Field, MicroscopeCache, simulated_fields
from acquire_refocus.sim.microscope import SimulatedMicroscope

log = logging.getLogger(__name__)

TILT_UM_PER_MM = 40.0
EMPTY_FIELD_CONTRAST = 0.25


@dataclass
class Sample:
    """One test frame."""

    field: str
    setting: str  # "flat" or "tilt"
    defocus_um: float  # true defocus (at the frame centre for tilted frames)
    raw: np.ndarray  # uint16
    truth: np.ndarray  # float32 ADU


def crop_psf(psf: np.ndarray, energy: float = 0.999) -> np.ndarray:
    """The smallest centred square holding `energy` of the PSF, renormalised: same result, much faster FFTs."""
    n = psf.shape[0]
    centre = n // 2
    total = float(psf.sum())
    for half in range(4, centre + 1, 4):
        window = psf[centre - half : centre + half + 1, centre - half : centre + half + 1]
        if window.sum() >= energy * total:
            cropped: np.ndarray = window / window.sum()
            return cropped
    whole: np.ndarray = psf / total
    return whole


class HeldOutSet:
    """Held-out test frames and access to the true PSFs of the simulator that made them."""

    def __init__(
        self,
        config: AppConfig,
        fields: int,
        window_px: int,
        distances_um: Sequence[float],
        tilt_distances_um: Sequence[float],
        seed: int = 0,
    ) -> None:
        self.config = config
        self.scopes = MicroscopeCache(config.optics, config.simulator, keep=1)
        self.fields = self._fields_with_cells(fields, window_px)
        signed = sorted({s * d for d in distances_um for s in (-1.0, 1.0)})
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
        self.samples: list[Sample] = []
        self._tilted_scope: tuple[int, SimulatedMicroscope] | None = None
        shape = (window_px, window_px)
        for field in self.fields:
            scope = self.scopes.get(field.seed)
            name = f"seed{field.seed}_x{field.x_um:g}_y{field.y_um:g}"
            planes, truth = scope.render_stack(signed, (field.x_um, field.y_um), rng=rng, shape_px=shape)
            self.samples += [Sample(name, "flat", d, planes[i], truth) for i, d in enumerate(signed)]
            if tilt_distances_um:
                self.samples += self._tilted(field, name, tilt_distances_um, truth, shape, rng)
        self.bank = scope.psf_bank
        self._tilted_scope = None

    def _fields_with_cells(self, count: int, window_px: int) -> list[Field]:
        """The first `count` test fields whose in-focus image shows cells: an empty field has a constant truth,
        for which PSNR is meaningless. A field counts as empty when its in-focus contrast (max - min) is below
        EMPTY_FIELD_CONTRAST of the best candidate's."""
        candidates = simulated_fields(count * 3, TEST_SEED_BASE, self.config.simulator.specimen.field_size_um)
        contrast = []
        for field in candidates:
            _, truth = self.scopes.get(field.seed).render_stack(
                [0.0], (field.x_um, field.y_um), noise=False, shape_px=(window_px, window_px)
            )
            contrast.append(float(np.ptp(truth)))
        threshold = EMPTY_FIELD_CONTRAST * max(contrast)
        chosen = [f for f, c in zip(candidates, contrast, strict=True) if c >= threshold][:count]
        skipped = sum(1 for c in contrast[: candidates.index(chosen[-1]) + 1] if c < threshold)
        log.info(kv("test_fields", chosen=len(chosen), skipped_empty=skipped))
        return chosen

    def _tilted(
        self,
        field: Field,
        name: str,
        distances_um: Sequence[float],
        truth: np.ndarray,
        shape: tuple[int, int],
        rng: np.random.Generator,
    ) -> list[Sample]:
        """Frames of the same field with the sample tilted along x (unseen in training). The tilted microscope has
        the same specimen seed, hence the same specimen; its in-focus ground truth is the flat one."""
        if self._tilted_scope is None or self._tilted_scope[0] != field.seed:
            drift = replace(
                self.config.simulator.drift, model="none", tilt_x_um_per_mm=TILT_UM_PER_MM, tilt_y_um_per_mm=0.0
            )
            simulator = replace(self.config.simulator, seed=field.seed, drift=drift)
            self._tilted_scope = (field.seed, SimulatedMicroscope(self.config.optics, simulator))
        tilted = self._tilted_scope[1]
        samples = []
        for d in sorted({s * d for d in distances_um for s in (-1.0, 1.0)}):
            xy = (field.x_um, field.y_um)
            stage_z = tilted.focus_z_um(xy) + d
            raw = tilted.render(stage_z, xy, rng=rng, shape_px=shape)
            samples.append(Sample(name, "tilt", tilted.defocus_um(stage_z, xy), raw, truth))
        return samples

    def true_psf(self, defocus_um: float) -> np.ndarray:
        return crop_psf(self.bank.plane(int(self.bank.index(defocus_um))).astype(np.float64))
