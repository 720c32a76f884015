"""NDTiff input (pycromanager / Micro-Manager 2 acquisitions), read with `ndstorage`, the NDTiff package's
successor from the same authors (installed with pycromanager). Axes `time`, `position`, `channel`, `z`; the pixel
size from the summary metadata (`PixelSize_um`) or the first image's (`PixelSizeUm`)."""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np

from acquire_refocus.errors import InputError
from acquire_refocus.reprocess.dataset import DatasetInfo, Position

_AXES = {"time": "t", "channel": "c", "z": "z"}


def is_ndtiff(path: Path) -> bool:
    return path.is_dir() and (path / "NDTiff.index").is_file()


def _open(path: Path) -> Any:
    import ndstorage

    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):  # ndstorage prints its progress on stdout
            return ndstorage.Dataset(str(path))
    except Exception as exc:  # noqa: BLE001 - ndstorage raises many types for a damaged dataset
        raise InputError(f"{path}: not a readable NDTiff dataset ({type(exc).__name__}: {exc})") from None


def _pixel_size_um(dataset: Any) -> float | None:
    summary = dataset.summary_metadata or {}
    value = summary.get("PixelSize_um")
    if not value:
        with contextlib.suppress(Exception):
            first = dataset.get_image_coordinates_list()[0]
            value = dataset.read_metadata(**first).get("PixelSizeUm")
    try:
        size = float(value) if value else None
    except (TypeError, ValueError):
        return None
    return size if size and size > 0 else None


def describe(path: Path) -> DatasetInfo:
    dataset = _open(path)
    try:
        values = {name: list(v) for name, v in dataset.axes.items()}
        unknown = set(values) - {"time", "position", "channel", "z"}
        if unknown:
            raise InputError(f"{path}: NDTiff axes {sorted(unknown)} are not supported (time, position, channel, z)")
        axes = tuple(a for a in ("t", "c", "z") if {v: k for k, v in _AXES.items()}[a] in values)
        plane_shape = tuple(len(values[{v: k for k, v in _AXES.items()}[a]]) for a in axes)
        positions = values.get("position", [0])
        pixel_size_um = _pixel_size_um(dataset)
        frame_shape = (int(dataset.image_height), int(dataset.image_width))
        dtype = str(np.dtype(dataset.dtype))
    finally:
        dataset.close()
    return DatasetInfo(
        kind="ndtiff",
        path=path,
        axes=(*axes, "y", "x"),
        shape=(*plane_shape, *frame_shape),
        dtype=dtype,
        chunks=(*(1 for _ in axes), *frame_shape),
        positions=tuple(Position(group=str(p), name=str(p)) for p in positions),
        has_position_axis="position" in values,
        pixel_size_um=pixel_size_um,
        channel_names=tuple(str(c) for c in values["channel"]) if "channel" in values else None,
        scale=(*(1.0 for _ in axes), pixel_size_um or 1.0, pixel_size_um or 1.0),
        units=(*(None for _ in axes), "micrometer" if pixel_size_um else None, "micrometer" if pixel_size_um else None),
        extra={"values": {name: tuple(v) for name, v in values.items()}},
    )


class Reader:
    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self._dataset = _open(info.path)
        self._names = {v: k for k, v in _AXES.items()}
        self._lock = threading.Lock()  # ndstorage's file handles are not meant for concurrent reads

    def read(self, position: int, index: tuple[int, ...]) -> np.ndarray:
        values = self.info.extra["values"]
        coordinates = {
            self._names[a]: values[self._names[a]][i] for a, i in zip(self.info.plane_axes, index, strict=True)
        }
        if "position" in values:
            coordinates["position"] = values["position"][position]
        with self._lock:
            if not self._dataset.has_image(**coordinates):
                raise InputError(f"no image at {coordinates} in the NDTiff dataset")
            return np.asarray(self._dataset.read_image(**coordinates))

    def close(self) -> None:
        self._dataset.close()
