"""The refocused OME-Zarr (v0.5, Zarr v3): the input's layout (one image, bioformats2raw positions, or a plate with
its wells and fields), axes, chunks along t, c, z, y, x, scales and channel names; float32 in the frames' intensity
units; full resolution only. Created once by the client with all metadata, so napari opens it at any time; the
workers then write whole chunks by region (zarr-python writes each chunk file atomically), and planes not yet
written read as 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from acquire_refocus.reprocess.batches import Block
from acquire_refocus.reprocess.dataset import DatasetInfo

VERSION = "0.5"
ARRAY = "0"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _image_attrs(info: DatasetInfo, name: str) -> dict[str, Any]:
    axes = []
    for axis, unit in zip(info.axes, info.units, strict=True):
        entry: dict[str, Any] = {"name": axis, "type": _AXIS_TYPES[axis]}
        if unit:
            entry["unit"] = unit
        axes.append(entry)
    scale = [s if s > 0 else 1.0 for s in info.scale]
    ome: dict[str, Any] = {
        "version": VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": [{"path": ARRAY, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
            }
        ],
    }
    if "c" in info.plane_axes:
        labels = info.channel_names or tuple(str(i) for i in range(info.shape[info.axes.index("c")]))
        ome["omero"] = {
            "channels": [
                {
                    "label": label,
                    "color": "FFFFFF",
                    "active": True,
                    "window": {"min": 0.0, "max": 65535.0, "start": 0.0, "end": 65535.0},
                }
                for label in labels
            ]
        }
    return {"ome": ome}


def create_store(info: DatasetInfo, path: Path) -> None:
    """Create the store with every group, its metadata and the empty arrays (refuses an existing `path`)."""
    import zarr

    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    if info.plate is not None:
        plate = {k: v for k, v in info.plate.items() if k != "version"}  # v0.4 kept it here; v0.5 at "ome"
        root.attrs.put({"ome": {"version": VERSION, "plate": plate}})
        for well in info.plate["wells"]:
            images = [p.group.rsplit("/", 1)[1] for p in info.positions if p.group.rsplit("/", 1)[0] == well["path"]]
            group = root.require_group(well["path"])
            group.attrs.put({"ome": {"version": VERSION, "well": {"images": [{"path": i} for i in images]}}})
    elif info.has_position_axis:
        root.attrs.put({"ome": {"version": VERSION, "bioformats2raw.layout": 3}})
    for position in info.positions:
        group = root.require_group(position.group) if position.group else root
        group.attrs.put(_image_attrs(info, position.name))
        group.create_array(
            ARRAY, shape=info.shape, chunks=info.chunks, dtype="float32", fill_value=0.0, dimension_names=info.axes
        )


_ARRAYS: dict[tuple[str, str], Any] = {}


def write_block(path: Path, info: DatasetInfo, block: Block, data: np.ndarray) -> None:
    """Write one write unit's planes (shape: the block's ranges, then y, x)."""
    import zarr

    group = info.positions[block.position].group
    key = (str(path), group)
    if key not in _ARRAYS:
        _ARRAYS[key] = zarr.open_array(str(path), mode="r+", path=f"{group}/{ARRAY}".strip("/"))
    region = (*(slice(a, b) for a, b in block.ranges), slice(None), slice(None))
    _ARRAYS[key][region] = data
