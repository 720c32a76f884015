"""A folder of single-plane TIFF files named in the BBBC layout: `..._<well>_s<site>_w<channel>...tif`
(e.g. BBBC006's `mcf-z-stacks-03212011_a01_s1_w1<hash>.tif`, BBBC021's `Week1_150607_B02_s1_w1<hash>.tif`).

Each (well, site) is a position of a plate, `w<n>` a channel. Files are read one at a time with tifffile; a missing
or unreadable file is a failed frame, the others go on. Files whose names do not follow the layout are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from acquire_refocus.errors import InputError
from acquire_refocus.reprocess.dataset import DatasetInfo, Position, as_plane
from acquire_refocus.reprocess.tiff import _ome_pixels, _open, _pixel_size_um

_NAME = re.compile(r"_(?P<row>[A-Za-z])(?P<column>\d{1,3})_s(?P<site>\d+)_w(?P<channel>\d+)")


def _parse(path: Path) -> tuple[str, str, int, str] | None:
    match = _NAME.search(path.name)
    if match is None or path.suffix.lower() not in (".tif", ".tiff"):
        return None
    return (match["row"].upper(), f"{int(match['column']):02d}", int(match["site"]), f"w{int(match['channel'])}")


def _files(path: Path) -> dict[tuple[str, str, int, str], Path]:
    files: dict[tuple[str, str, int, str], Path] = {}
    for file in sorted(path.iterdir()):
        key = _parse(file)
        if key is not None:
            if key in files:
                raise InputError(f"{path}: {files[key].name} and {file.name} are the same well, site and channel")
            files[key] = file
    return files


def describe(path: Path) -> DatasetInfo:
    files = _files(path)
    if not files:
        raise InputError(
            f"{path}: a folder without TIFF files named in the BBBC layout (..._A01_s1_w1....tif), "
            "and not an OME-Zarr or NDTiff dataset"
        )
    rows = sorted({k[0] for k in files})
    columns = sorted({k[1] for k in files}, key=int)
    sites = sorted({(k[0], k[1], k[2]) for k in files}, key=lambda s: (s[0], int(s[1]), s[2]))
    channels = sorted({k[3] for k in files}, key=lambda c: int(c[1:]))
    first = next(iter(files.values()))
    tif = _open(first)
    try:
        plane = as_plane(tif.asarray(), str(first))
        pixel_size_um = _pixel_size_um(tif, _ome_pixels(tif))
    finally:
        tif.close()
    wells = sorted({(r, c) for r, c, _ in sites}, key=lambda w: (w[0], int(w[1])))
    positions = []
    for row, column, site in sites:
        index = [s for s in sites if s[:2] == (row, column)].index((row, column, site))
        positions.append(
            Position(group=f"{row}/{column}/{index}", name=f"{row}{column}_s{site}", well=f"{row}{column}", site=site)
        )
    plate = {
        "name": path.name,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in columns],
        "wells": [{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": columns.index(c)} for r, c in wells],
        "field_count": max(sum(1 for s in sites if s[:2] == w) for w in wells),
    }
    frame_shape = (int(plane.shape[0]), int(plane.shape[1]))
    return DatasetInfo(
        kind="folder",
        path=path,
        axes=("c", "y", "x"),
        shape=(len(channels), *frame_shape),
        dtype=str(plane.dtype),
        chunks=(1, *frame_shape),
        positions=tuple(positions),
        has_position_axis=True,
        pixel_size_um=pixel_size_um,
        channel_names=tuple(channels),
        scale=(1.0, pixel_size_um or 1.0, pixel_size_um or 1.0),
        units=(None, "micrometer" if pixel_size_um else None, "micrometer" if pixel_size_um else None),
        plate=plate,
        extra={
            "files": {
                (p, channels.index(k[3])): files[k].name for k in files for p, s in enumerate(sites) if s == k[:3]
            }
        },
    )


class Reader:
    def __init__(self, info: DatasetInfo) -> None:
        self.info = info

    def read(self, position: int, index: tuple[int, ...]) -> np.ndarray:
        name = self.info.extra["files"].get((position, index[0]))
        if name is None:
            raise InputError(
                f"no file for {self.info.positions[position].name} channel "
                f"{self.info.channel_names[index[0]] if self.info.channel_names else index[0]}"
            )
        path = self.info.path / name
        tif = _open(path)
        try:
            return as_plane(tif.asarray(), str(path))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: tifffile raises many types
            raise InputError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
        finally:
            tif.close()

    def close(self) -> None:
        return None  # each file is opened and closed by read()
