"""OME-TIFF and plain TIFF stacks, read page by page with tifffile.

Axes come from tifffile's series (`TCZYX`-like letters from the OME-XML or ImageJ metadata); a plain stack's
generic frame axis (`I` / `Q`) is taken as time. Several OME images of one shape are positions. The pixel size is
the OME `PhysicalSizeX` or, for ImageJ files, the X resolution in microns.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from acquire_refocus.errors import InputError
from acquire_refocus.reprocess.dataset import DatasetInfo, Position

_LETTERS = {"T": "t", "C": "c", "Z": "z", "I": "t", "Q": "t", "Y": "y", "X": "x"}
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "mm": 1e3}


def _open(path: Path) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a damaged or foreign file
        raise InputError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from None


def _series_axes(series: Any, path: Path) -> tuple[str, ...]:
    letters = str(series.axes).upper()
    if letters[-2:] != "YX":
        raise InputError(f"{path}: TIFF axes {letters!r} do not end in YX (an RGB or tiled image?); not supported")
    names = tuple(_LETTERS.get(letter, "?") for letter in letters)
    if "?" in names or len(set(names)) != len(names):
        raise InputError(f"{path}: TIFF axes {letters!r} cannot be read as (t, c, z, y, x)")
    return names


def _ome_pixels(tif: Any) -> list[dict[str, Any]]:
    import tifffile

    if not tif.is_ome or not tif.ome_metadata:
        return []
    images = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", [])
    images = images if isinstance(images, list) else [images]
    return [image.get("Pixels", {}) for image in images]


def _pixel_size_um(tif: Any, pixels: list[dict[str, Any]]) -> float | None:
    if pixels and "PhysicalSizeX" in pixels[0]:
        unit = str(pixels[0].get("PhysicalSizeXUnit", "µm"))
        return float(pixels[0]["PhysicalSizeX"]) * _UNIT_TO_UM[unit] if unit in _UNIT_TO_UM else None
    imagej = tif.imagej_metadata or {}
    resolution = tif.pages[0].tags.get("XResolution")
    if str(imagej.get("unit", "")).lower() in ("micron", "um", "µm", "\\u00B5m") and resolution is not None:
        numerator, denominator = resolution.value
        return float(denominator) / float(numerator) if numerator else None
    return None


def describe(path: Path) -> DatasetInfo:
    tif = _open(path)
    try:
        series = list(tif.series)
        if not series:
            raise InputError(f"{path}: a TIFF file without images")
        first = series[0]
        names = _series_axes(first, path)
        same = [s for s in series if s.shape == first.shape and s.axes == first.axes]
        if tif.is_ome and len(same) != len(series):
            raise InputError(f"{path}: its OME images differ in shape; positions of different shapes are not supported")
        count = len(series) if tif.is_ome else 1
        order = [names.index(a) for a in ("t", "c", "z") if a in names]
        axes = tuple(names[i] for i in order)
        pixels = _ome_pixels(tif)
        pixel_size_um = _pixel_size_um(tif, pixels)
        channel_names = None
        if "c" in axes and pixels:
            channels = pixels[0].get("Channel", [])
            channels = channels if isinstance(channels, list) else [channels]
            if len(channels) == first.shape[names.index("c")] and all("Name" in ch for ch in channels):
                channel_names = tuple(str(ch["Name"]) for ch in channels)
        frame_shape = (int(first.shape[-2]), int(first.shape[-1]))
        shape = (*(int(first.shape[i]) for i in order), *frame_shape)
        dtype = str(first.dtype)
    finally:
        tif.close()
    return DatasetInfo(
        kind="tiff",
        path=path,
        axes=(*axes, "y", "x"),
        shape=shape,
        dtype=dtype,
        chunks=(*(1 for _ in axes), *frame_shape),
        positions=tuple(Position(group=str(p), name=str(p)) for p in range(count)),
        has_position_axis=count > 1,
        pixel_size_um=pixel_size_um,
        channel_names=channel_names,
        scale=(*(1.0 for _ in axes), pixel_size_um or 1.0, pixel_size_um or 1.0),
        units=(*(None for _ in axes), "micrometer" if pixel_size_um else None, "micrometer" if pixel_size_um else None),
        extra={"order": tuple(order), "series_plane_shape": tuple(int(n) for n in first.shape[:-2])},
    )


class Reader:
    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self._tif = _open(info.path)
        self._lock = threading.Lock()  # one file handle: its seeks and reads must not interleave

    def read(self, position: int, index: tuple[int, ...]) -> np.ndarray:
        series_index = [0] * len(self.info.extra["series_plane_shape"])
        for axis, i in zip(self.info.extra["order"], index, strict=True):
            series_index[axis] = i
        page_number = (
            int(np.ravel_multi_index(series_index, self.info.extra["series_plane_shape"])) if series_index else 0
        )
        with self._lock:
            page = self._tif.series[position].pages[page_number]
            if page is None:
                raise InputError(f"plane {page_number} of image {position} is missing from the file")
            return np.asarray(page.asarray())

    def close(self) -> None:
        self._tif.close()
