"""Disk space for a run: refused before it starts when the sequence cannot fit, stopped cleanly when the disk
runs low during it (another program filled it), so that no raw frame is ever acquired that cannot be written.

The need is counted without compression (the stores write one uncompressed chunk per frame at worst): raw
frames at the camera's bytes per pixel, refocused frames as float32, one file-system block per chunk, and a fixed
allowance per store for its metadata. While a run goes on, frames acquired but not yet on disk (the correction
queue, the results waiting for the sinks, the refocused store's queue and its writes in flight) are the
`margin_frames`: the run stops when the free space falls below what they need plus `storage.min_free_mb`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from acquire_refocus.errors import UserError

BLOCK_BYTES = 4096  # a chunk file takes at least one file-system block
STORE_METADATA_BYTES = 1024 * 1024  # zarr.json files, OME metadata, the focus log and run.json of a short run
REFOCUSED_BYTES_PER_PX = 4  # float32


@dataclass(frozen=True)
class SpaceNeed:
    """Bytes one run writes: per frame, fixed, and what must stay free while frames are in flight."""

    frames: int
    bytes_per_frame: int
    fixed_bytes: int
    margin_bytes: int  # frames acquired and not yet written, at most
    reserve_bytes: int  # storage.min_free_mb

    @property
    def total_bytes(self) -> int:
        return self.frames * self.bytes_per_frame + self.fixed_bytes + self.margin_bytes + self.reserve_bytes

    @property
    def low_water_bytes(self) -> int:
        """Free space below which the run stops: what frames in flight need, plus the reserve."""
        return self.margin_bytes + self.reserve_bytes


def space_need(
    frames: int,
    height_px: int,
    width_px: int,
    raw_bytes_per_px: int | None,
    save_refocused: bool,
    margin_frames: int,
    min_free_mb: float,
) -> SpaceNeed:
    """The SpaceNeed of `frames` frames of height x width; `raw_bytes_per_px` None when the raw store is off."""
    pixels = height_px * width_px
    per_frame = 0
    stores = 0
    if raw_bytes_per_px is not None:
        per_frame += pixels * raw_bytes_per_px + BLOCK_BYTES
        stores += 1
    if save_refocused:
        per_frame += pixels * REFOCUSED_BYTES_PER_PX + BLOCK_BYTES
        stores += 1
    per_frame += 2048  # the focus log's row (~0.2 KB) and the raw frame log's line (~0.7 KB on the simulator)
    return SpaceNeed(
        frames,
        per_frame,
        (stores + 1) * STORE_METADATA_BYTES,
        margin_frames * per_frame,
        int(min_free_mb * 1024 * 1024),
    )


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer can still use in the file system of `folder`."""
    return shutil.disk_usage(folder).free


def check_space(folder: str | Path, need: SpaceNeed) -> None:
    """UserError naming the folder and the figures when the run cannot fit; the acquisition has not started."""
    free = free_bytes(folder)
    if free < need.total_bytes:
        raise UserError(
            f"{folder}: {_mb(free)} free, the run needs {_mb(need.total_bytes)} ({need.frames:,} frames x "
            f"{_mb(need.bytes_per_frame)} uncompressed, {_mb(need.margin_bytes)} for frames in flight and "
            f"storage.min_free_mb {_mb(need.reserve_bytes)} kept free); free space, shorten the sequence, or "
            "choose another --output"
        )


def low_space_problem(folder: str | Path, need: SpaceNeed) -> str:
    """Why the run must stop now for lack of space, or ""."""
    try:
        free = free_bytes(folder)
    except OSError as exc:
        return f"cannot read the free space of {folder}: {exc}"
    if free < need.low_water_bytes:
        return (
            f"disk almost full: {_mb(free)} free in {folder}, below the {_mb(need.low_water_bytes)} that "
            "frames in flight and storage.min_free_mb need; the acquisition was stopped"
        )
    return ""


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1024 / 1024:.1f} MB"
