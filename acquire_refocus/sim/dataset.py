"""Simulated z-stack datasets: `write_simulated_dataset` renders stacks with the simulated microscope into the
BBBC006-like folder layout that `datasets.zstack.read_zstack_folders` reads, with exactly known defocus and a
noiseless in-focus ground truth, and records every parameter in `dataset.json` so the data can be regenerated
from its seed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from acquire_refocus import __version__
from acquire_refocus.config import OpticsConfig, SimulatorConfig
from acquire_refocus.datasets.zstack import DATASET_FORMAT, DATASET_VERSION, GROUND_TRUTH_FOLDER, MANIFEST_NAME
from acquire_refocus.errors import InputError
from acquire_refocus.logs import kv
from acquire_refocus.outputs import output_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenDataset:
    """What `write_simulated_dataset` wrote."""

    root: Path
    fields: int
    defocus_um: tuple[float, ...]
    in_focus_index: int | None
    frame_shape_px: tuple[int, int]
    pixel_size_um: float
    bytes_written: int
    seconds: float


def _plane_folder_names(count: int) -> list[str]:
    width = max(2, len(str(count - 1)))
    return [f"z{i:0{width}d}" for i in range(count)]


def _check_defocus(defocus_um: Sequence[float], simulator: SimulatorConfig) -> list[float]:
    values = [float(d) for d in defocus_um]
    if not values:
        raise InputError("defocus_um: give at least one plane")
    if not all(np.isfinite(values)):
        raise InputError(f"defocus_um: every value must be a finite number, got {values}")
    if len(set(values)) != len(values):
        raise InputError(f"defocus_um: planes must be distinct, got {values}")
    limit = simulator.max_defocus_um
    outside = [d for d in values if abs(d) > limit]
    if outside:
        raise InputError(
            f"defocus_um: {outside} lie beyond the simulated PSF range +/-{limit:g} um "
            "(raise simulator.max_defocus_um in the config to go further)"
        )
    return sorted(values)


def _field_positions_um(simulator: SimulatorConfig, fields: int, rng: np.random.Generator) -> np.ndarray:
    """Stage XY of each field, uniform over one period of the (periodic) specimen, so fields show different cells."""
    return rng.uniform(0.0, np.asarray(simulator.specimen.field_size_um, dtype=np.float64), size=(fields, 2))


def _write_tiff(path: Path, image: np.ndarray, description: dict[str, Any]) -> int:
    # zlib (deflate): lossless, and read by every TIFF reader, ImageJ/Fiji and CellProfiler included.
    tifffile.imwrite(path, image, compression="zlib", description=json.dumps(description), metadata=None)
    return path.stat().st_size


def write_simulated_dataset(
    out_dir: str | Path,
    optics: OpticsConfig,
    simulator: SimulatorConfig,
    fields: int,
    defocus_um: Sequence[float],
    seed: int,
) -> WrittenDataset:
    """Render `fields` z-stacks at the given defocus values into a BBBC006-like folder tree.

    Layout: `z00/ ... zNN/` (one folder per plane, in increasing defocus, i.e. increasing stage Z), each with
    `field0000.tif ...` (16-bit camera counts with noise); `ground_truth/field0000.tif` (float32, the noiseless
    in-focus image in the same counts); `dataset.json` (every parameter, so the same seed regenerates the same
    data; written last, so a folder without it is an interrupted run). `out_dir` must be new or empty, so an
    existing dataset is never overwritten.
    """
    # Imported here: the renderer pulls in the PSF machinery, which reading a dataset does not need.
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    out = Path(out_dir)
    if fields < 1:
        raise InputError(f"fields: need at least 1 field of view, got {fields}")
    planes_um = _check_defocus(defocus_um, simulator)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    output_folder(out, "output folder")

    started = time.perf_counter()
    scope = SimulatedMicroscope(optics, simulator)
    field_seeds = np.random.SeedSequence(seed).spawn(fields + 1)
    positions_um = _field_positions_um(simulator, fields, np.random.default_rng(field_seeds[-1]))
    folder_names = _plane_folder_names(len(planes_um))
    in_focus_index = planes_um.index(0.0) if 0.0 in planes_um else None
    for name in (*folder_names, GROUND_TRUTH_FOLDER):
        (out / name).mkdir(parents=True, exist_ok=True)

    width = max(4, len(str(fields - 1)))
    field_records: list[dict[str, Any]] = []
    bytes_written = 0
    for index in range(fields):
        name = f"field{index:0{width}d}"
        file_name = f"{name}.tif"
        xy_um = (float(positions_um[index, 0]), float(positions_um[index, 1]))
        stack, ground_truth = scope.render_stack(
            planes_um, stage_xy_um=xy_um, noise=True, rng=np.random.default_rng(field_seeds[index])
        )
        for folder, plane, d_um in zip(folder_names, stack, planes_um, strict=True):
            bytes_written += _write_tiff(
                out / folder / file_name, plane, {"field": name, "defocus_um": d_um, "stage_xy_um": xy_um}
            )
        bytes_written += _write_tiff(
            out / GROUND_TRUTH_FOLDER / file_name,
            ground_truth.astype(np.float32, copy=False),
            {"field": name, "defocus_um": 0.0, "stage_xy_um": xy_um, "noiseless": True},
        )
        field_records.append({"name": name, "file": file_name, "stage_xy_um": list(xy_um)})
        x_um, y_um = f"{xy_um[0]:.1f}", f"{xy_um[1]:.1f}"
        log.info(kv("simulated_field_written", field=name, index=index + 1, of=fields, x_um=x_um, y_um=y_um))

    height_px, width_px = (int(n) for n in scope.frame_shape)
    manifest = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "created_by": f"acquire-refocus {__version__}",
        "seed": int(seed),
        "sign_convention": "defocus_um = stage Z of plane - stage Z in focus; positive = deeper into the sample",
        "pixel_size_um": scope.pixel_size_um,
        "frame_shape_px": [height_px, width_px],
        "dtype": "uint16",
        "in_focus_index": in_focus_index,
        "planes": [{"folder": f, "defocus_um": d} for f, d in zip(folder_names, planes_um, strict=True)],
        "ground_truth_folder": GROUND_TRUTH_FOLDER,
        "ground_truth": "noiseless in-focus image, float32, same ADU scale as the planes",
        "fields": field_records,
        "optics": optics.model_dump(mode="json"),
        "simulator": simulator.model_dump(mode="json"),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    written = WrittenDataset(
        root=out,
        fields=fields,
        defocus_um=tuple(planes_um),
        in_focus_index=in_focus_index,
        frame_shape_px=(height_px, width_px),
        pixel_size_um=scope.pixel_size_um,
        bytes_written=bytes_written,
        seconds=time.perf_counter() - started,
    )
    log.info(kv("simulated_dataset_written", root=out, fields=fields, planes=len(planes_um), bytes=bytes_written))
    return written
