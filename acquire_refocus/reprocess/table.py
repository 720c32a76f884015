"""The focus table. Each finished task writes its rows as one Parquet part (`DIR/.parts/batch-NNNNNNN.parquet`),
renamed into place only after its frames are in the Zarr store: a part present means the batch is done and its
pixels are written, so a rerun skips exactly those batches. At the end the parts are merged, sorted by the axes,
into `DIR/focus.parquet` (and `focus.csv` on request), and the parts are removed."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acquire_refocus.reprocess.dataset import DatasetInfo

PARTS = ".parts"
TABLE = "focus.parquet"
CSV = "focus.csv"
_PART = re.compile(r"^batch-(\d+)\.parquet$")
STATUSES = ("refocused", "failed", "skipped")


def schema(info: DatasetInfo) -> Any:
    import pyarrow as pa

    fields = [pa.field(axis, pa.int32(), nullable=False) for axis in info.table_axes()]
    if info.has_position_axis:
        fields.append(pa.field("position", pa.string()))
    if info.plate is not None or any(p.well for p in info.positions):
        fields += [pa.field("well", pa.string()), pa.field("site", pa.int32())]
    if "c" in info.plane_axes:
        fields.append(pa.field("channel", pa.string()))
    fields += [
        pa.field(name, pa.float64()) for name in ("defocus_magnitude_um", "defocus_um", "confidence", "sharpness")
    ]
    fields += [pa.field("status", pa.string(), nullable=False), pa.field("reason", pa.string())]
    return pa.schema(fields)


def part_path(out: Path, batch: int) -> Path:
    return out / PARTS / f"batch-{batch:07d}.parquet"


def write_part(out: Path, batch: int, rows: Sequence[dict[str, Any]], info: DatasetInfo) -> None:
    """Write a batch's rows atomically (a temporary name, then a rename): never half a part under the real name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = part_path(out, batch)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema(info)), temp)
    os.replace(temp, target)


def done_batches(out: Path) -> set[int]:
    folder = out / PARTS
    if not folder.is_dir():
        return set()
    return {int(m[1]) for name in os.listdir(folder) if (m := _PART.match(name))}


def merge(out: Path, info: DatasetInfo, csv: bool) -> Any:
    """Merge the parts into focus.parquet (and focus.csv), sorted by t, p, c, z; remove the parts. The table."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    folder = out / PARTS
    parts = sorted(p for p in folder.iterdir() if _PART.match(p.name))
    table = (
        pa.concat_tables([pq.read_table(p, schema=schema(info)) for p in parts])
        if parts
        else schema(info).empty_table()
    )
    axes = info.table_axes()
    if axes:
        table = table.sort_by([(axis, "ascending") for axis in axes])
    temp = out / f".{TABLE}.tmp"
    pq.write_table(table, temp)
    os.replace(temp, out / TABLE)
    if csv:
        pcsv.write_csv(table, out / f".{CSV}.tmp")
        os.replace(out / f".{CSV}.tmp", out / CSV)
    shutil.rmtree(folder)
    return table
