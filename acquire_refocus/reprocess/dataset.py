"""A dataset as the reprocessing sees it: positions, each an image of axes (t, c, z, y, x) with some of t, c, z
absent, the pixel size, the channel names, and a reader that returns one 2-D plane at a time.

`DatasetInfo` is small and picklable: the client builds it once from the metadata and ships it with every task;
each worker opens its own reader from it (`reader_for`, cached per process), so frames are read where they are
processed and nothing is loaded whole.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from acquire_refocus.errors import InputError

Kind = Literal["ome-zarr", "ndtiff", "tiff", "folder"]
PLANE_AXES = ("t", "c", "z")  # the non-spatial axes of one position's image, in OME-NGFF order


@dataclass(frozen=True)
class Position:
    """One image of the dataset. `group` is its path inside an OME-Zarr (input and output)."""

    group: str
    name: str
    well: str | None = None
    site: int | None = None


@dataclass(frozen=True)
class DatasetInfo:
    kind: Kind
    path: Path
    axes: tuple[str, ...]  # of each position's image: a subset of t, c, z in that order, then y, x
    shape: tuple[int, ...]  # matching `axes`
    dtype: str
    chunks: tuple[int, ...]  # write unit of the output, matching `axes` (the input's chunks or shards for a Zarr)
    positions: tuple[Position, ...]
    has_position_axis: bool  # False: a single image (no `p` column, the output store is that image)
    pixel_size_um: float | None
    channel_names: tuple[str, ...] | None
    scale: tuple[float, ...]  # per axis, for the output's metadata
    units: tuple[str | None, ...]
    plate: Mapping[str, Any] | None = None  # OME-NGFF plate metadata, when the dataset is a plate
    extra: Mapping[str, Any] = field(default_factory=dict)  # reader-specific (e.g. NDTiff axis values)

    @property
    def plane_axes(self) -> tuple[str, ...]:
        return self.axes[:-2]

    @property
    def plane_shape(self) -> tuple[int, ...]:
        return self.shape[:-2]

    @property
    def frame_shape(self) -> tuple[int, int]:
        return int(self.shape[-2]), int(self.shape[-1])

    @property
    def frames_per_position(self) -> int:
        return math.prod(self.plane_shape)

    @property
    def frame_count(self) -> int:
        return self.frames_per_position * len(self.positions)

    def table_axes(self) -> tuple[str, ...]:
        """The index columns of the focus table, in the order t, p, c, z."""
        present = set(self.plane_axes) | ({"p"} if self.has_position_axis else set())
        return tuple(a for a in ("t", "p", "c", "z") if a in present)

    def frames(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(position, plane index over `plane_axes`) for every frame."""
        for p in range(len(self.positions)):
            for index in itertools.product(*(range(n) for n in self.plane_shape)):
                yield p, index


class FrameReader(Protocol):
    """Reads one plane; safe to call from several threads. Raises InputError (or whatever the library raises) for
    a frame it cannot read."""

    def read(self, position: int, index: tuple[int, ...]) -> np.ndarray: ...

    def close(self) -> None: ...


def select_channels(info: DatasetInfo, names: list[str] | None) -> tuple[int, ...] | None:
    """Channel indices to correct (None: all). InputError naming the channels there are for an unknown name."""
    if not names:
        return None
    if "c" not in info.plane_axes:
        raise InputError(f"{info.path}: --channel was given but the dataset has no channel axis")
    known = list(info.channel_names or [str(i) for i in range(info.shape[info.axes.index("c")])])
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(
            f"{info.path}: no channel named {', '.join(map(repr, missing))}; the dataset's channels "
            f"are {', '.join(map(repr, known))}"
        )
    return tuple(sorted({known.index(n) for n in names}))


def open_dataset(path: Path) -> DatasetInfo:
    """The dataset at `path`, from its metadata alone; InputError when it is none of the supported formats."""
    from acquire_refocus.reprocess import folder, ndtiff, ome_zarr, tiff

    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if ome_zarr.is_ome_zarr(path):
        return ome_zarr.describe(path)
    if ndtiff.is_ndtiff(path):
        return ndtiff.describe(path)
    if path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
        return tiff.describe(path)
    if path.is_dir():
        return folder.describe(path)
    raise InputError(
        f"{path}: not a dataset this command reads (an .ome.zarr folder, an NDTiff folder, an "
        "OME-TIFF or TIFF file, or a folder of single-plane TIFF files)"
    )


_READERS: dict[tuple[str, str], FrameReader] = {}
_READERS_LOCK = threading.Lock()


def open_reader(info: DatasetInfo) -> FrameReader:
    from acquire_refocus.reprocess import folder, ndtiff, ome_zarr, tiff

    readers: dict[str, Callable[[DatasetInfo], FrameReader]] = {
        "ome-zarr": ome_zarr.Reader,
        "ndtiff": ndtiff.Reader,
        "tiff": tiff.Reader,
        "folder": folder.Reader,
    }
    return readers[info.kind](info)


def reader_for(info: DatasetInfo) -> FrameReader:
    """This worker process's reader for `info`, opened once (a worker reads many batches of one dataset) and kept
    open for the life of the process."""
    key = (info.kind, str(info.path))
    with _READERS_LOCK:  # a worker with several threads runs several tasks at once
        if key not in _READERS:
            for reader in _READERS.values():  # one dataset at a time per process
                reader.close()
            _READERS.clear()
            _READERS[key] = open_reader(info)
        return _READERS[key]


def as_plane(image: Any, where: str) -> np.ndarray:
    """A read plane as a 2-D array; InputError for anything else (an RGB plane, a stack)."""
    array = np.asarray(image)
    if array.ndim > 2:
        array = array.squeeze()
    if array.ndim != 2:
        raise InputError(f"{where}: expected a 2-D plane, got shape {array.shape}")
    return array
