"""OME-Zarr input (OME-NGFF v0.4 on Zarr v2, v0.5 on Zarr v3), read with zarr-python.

Three layouts: a single image (multiscales at the root); bioformats2raw (`bioformats2raw.layout`, one image group
per position, numbered: what ome-writers, and so this daemon's `raw.ome.zarr`, writes for several positions);
and an HCS plate (`plate` -> wells -> fields). Only the full-resolution level is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from acquire_refocus.errors import InputError
from acquire_refocus.reprocess.dataset import DatasetInfo, Position

_UNIT_TO_UM = {
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "millimeter": 1e3,
    "mm": 1e3,
}
_TYPE_TO_AXIS = {"time": "t", "channel": "c"}


def _ome(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The OME metadata of a group's attributes: under "ome" in v0.5, at the top in v0.4."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, Mapping) else attrs


def is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and (
        (path / "zarr.json").is_file() or (path / ".zattrs").is_file() or (path / ".zgroup").is_file()
    )


def _open_group(path: Path, where: str = "") -> Any:
    import zarr

    try:
        return zarr.open_group(str(path), mode="r", path=where or None)
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for a damaged or foreign store
        raise InputError(f"{path / where}: not a readable Zarr group ({type(exc).__name__}: {exc})") from None


def _positions(path: Path, root: Any) -> tuple[list[Position], Mapping[str, Any] | None, bool]:
    ome = _ome(root.attrs.asdict())
    if "multiscales" in ome:
        return [Position(group="", name="0")], None, False
    if "plate" in ome:
        plate = ome["plate"]
        positions: list[Position] = []
        for well in plate.get("wells", []):
            well_path = str(well["path"])
            well_meta = _ome(_open_group(path, well_path).attrs.asdict()).get("well", {})
            row, column = well_path.split("/")[:2] if "/" in well_path else (well_path, "")
            for site, image in enumerate(well_meta.get("images", [])):
                positions.append(
                    Position(
                        group=f"{well_path}/{image['path']}",
                        name=f"{row}{column}_s{site}",
                        well=f"{row}{column}",
                        site=site,
                    )
                )
        if not positions:
            raise InputError(f"{path}: an OME-Zarr plate without wells or fields")
        return positions, plate, True
    if "bioformats2raw.layout" in ome:
        names = sorted((k for k in root.group_keys() if k.isdigit()), key=int)
        if not names:
            raise InputError(f"{path}: a bioformats2raw OME-Zarr without image groups")
        return [Position(group=n, name=n) for n in names], None, True
    raise InputError(f"{path}: a Zarr store without OME-NGFF image, plate or bioformats2raw metadata")


def _axis_names(axes: list[Any], where: Path) -> tuple[str, ...]:
    names: list[str] = []
    for i, axis in enumerate(axes):
        name = str(axis["name"] if isinstance(axis, Mapping) else axis).lower()
        kind = axis.get("type") if isinstance(axis, Mapping) else None
        if name not in ("t", "c", "z", "y", "x"):
            name = _TYPE_TO_AXIS.get(str(kind), "z" if kind == "space" and i < len(axes) - 2 else name)
        names.append(name)
    if names[-2:] != ["y", "x"] or len(set(names)) != len(names) or not set(names) <= {"t", "c", "z", "y", "x"}:
        raise InputError(f"{where}: axes {names} are not a subset of (t, c, z, y, x) ending in y, x")
    return tuple(names)


def _image(path: Path, group: str) -> tuple[dict[str, Any], Any]:
    import zarr

    meta = _ome(_open_group(path, group).attrs.asdict())
    multiscales = meta.get("multiscales")
    if not multiscales:
        raise InputError(f"{path / group}: no OME-NGFF multiscales metadata")
    first = multiscales[0]
    dataset = first["datasets"][0]
    try:
        array = zarr.open_array(str(path), mode="r", path=f"{group}/{dataset['path']}".strip("/"))
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for a damaged or foreign array
        raise InputError(f"{path / group}: its image array cannot be opened ({type(exc).__name__}: {exc})") from None
    scale = [1.0] * array.ndim
    for transforms in (first.get("coordinateTransformations", []), dataset.get("coordinateTransformations", [])):
        for transform in transforms:
            if transform.get("type") == "scale":
                scale = [a * float(b) for a, b in zip(scale, transform["scale"], strict=False)]
    return {"multiscale": first, "omero": meta.get("omero"), "scale": scale}, array


def describe(path: Path) -> DatasetInfo:
    root = _open_group(path)
    positions, plate, has_position_axis = _positions(path, root)
    meta, array = _image(path, positions[0].group)
    axes = _axis_names(meta["multiscale"]["axes"], path / positions[0].group)
    if len(axes) != array.ndim:
        raise InputError(f"{path}: {len(axes)} axes in the metadata for an array of {array.ndim} dimensions")
    for position in positions[1:]:
        if _image(path, position.group)[1].shape != array.shape:
            raise InputError(
                f"{path / position.group}: its shape differs from {positions[0].group or 'the first'}'s "
                f"{array.shape}; positions of different shapes are not supported"
            )
    units = tuple(ax.get("unit") if isinstance(ax, Mapping) else None for ax in meta["multiscale"]["axes"])
    x_unit = units[-1]
    pixel_size_um = None
    if x_unit is not None and str(x_unit).lower() in _UNIT_TO_UM and meta["scale"][-1] > 0:
        pixel_size_um = float(meta["scale"][-1]) * _UNIT_TO_UM[str(x_unit).lower()]
    channel_names = None
    omero = meta["omero"]
    if "c" in axes and isinstance(omero, Mapping) and len(omero.get("channels", [])) == array.shape[axes.index("c")]:
        channel_names = tuple(str(ch.get("label", i)) for i, ch in enumerate(omero["channels"]))
    write_unit = getattr(array, "shards", None) or array.chunks
    return DatasetInfo(
        kind="ome-zarr",
        path=path,
        axes=axes,
        shape=tuple(int(n) for n in array.shape),
        dtype=str(array.dtype),
        chunks=tuple(int(n) for n in write_unit),
        positions=tuple(positions),
        has_position_axis=has_position_axis,
        pixel_size_um=pixel_size_um,
        channel_names=channel_names,
        scale=tuple(meta["scale"]),
        units=units,
        plate=plate,
        extra={"array_path": meta["multiscale"]["datasets"][0]["path"]},
    )


class Reader:
    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self._arrays: dict[int, Any] = {}

    def read(self, position: int, index: tuple[int, ...]) -> np.ndarray:
        import zarr

        if position not in self._arrays:
            group = self.info.positions[position].group
            self._arrays[position] = zarr.open_array(
                str(self.info.path), mode="r", path=f"{group}/{self.info.extra['array_path']}".strip("/")
            )
        return np.asarray(self._arrays[position][index])

    def close(self) -> None:
        self._arrays.clear()
