"""The Dask side: one Refocuser per worker (a WorkerPlugin), the task that refocuses one batch, and the loop that
submits batches to a cluster and collects their counts.

Each worker loads the model once, on the engine `auto` finds there (TensorRT on a GPU worker, ONNX Runtime on a
CPU one), with as many engine threads as the worker has Dask threads (`dask worker --nthreads`, or the embedded
cluster's share of the cores), so workers do not oversubscribe the cores; a worker's tasks take turns on the engine
and overlap their reading and writing with it. Tasks read their frames, write their chunks and their table part
themselves, and return only counts, so the client's memory does not grow with the dataset. A task lost with its
worker is rerun elsewhere by Dask (`distributed.scheduler.allowed-failures`, default 3): it rewrites the same chunks
with the same values, and its table part appears once.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed import WorkerPlugin

from acquire_refocus.errors import InputError
from acquire_refocus.reprocess.batches import Batch
from acquire_refocus.reprocess.dataset import DatasetInfo, as_plane, reader_for
from acquire_refocus.reprocess.output import write_block
from acquire_refocus.reprocess.table import write_part

if TYPE_CHECKING:
    from distributed import Client, Future

log = logging.getLogger(__name__)

PLUGIN_NAME = "acquire-refocus-refocuser"


class RefocuserPlugin(WorkerPlugin):
    """Loads the Refocuser once per worker process (and again in a worker that replaces a lost one)."""

    name = PLUGIN_NAME

    def __init__(self, weights: Path | None, engine: str, threads: int | None) -> None:
        self.weights = weights
        self.engine = engine
        self.threads = threads

    def setup(self, worker: Any) -> None:
        from acquire_refocus.config import EngineConfig
        from acquire_refocus.refocuser import Refocuser
        from acquire_refocus.sharpness import BandPassSharpness

        threads = self.threads or int(worker.state.nthreads)
        engine = EngineConfig.model_validate({"backend": self.engine, "num_threads": threads})
        self.refocuser = Refocuser.load(self.weights, engine=engine)
        self.sharpness = BandPassSharpness.for_optics(self.refocuser.loaded.optics)
        self.lock = threading.Lock()  # one inference at a time per worker; the engine has the worker's threads


@dataclass(frozen=True)
class Job:
    """What every task of a run needs besides its batch."""

    info: DatasetInfo
    out: Path
    store: Path | None  # the refocused OME-Zarr, None with --no-images
    channels: tuple[int, ...] | None  # None: all
    pixel_size_um: float | None


def _base_row(info: DatasetInfo, position: int, index: tuple[int, ...]) -> dict[str, Any]:
    named = dict(zip(info.plane_axes, index, strict=True))
    row: dict[str, Any] = {axis: (position if axis == "p" else named[axis]) for axis in info.table_axes()}
    where = info.positions[position]
    if info.has_position_axis:
        row["position"] = where.name
    if info.plate is not None or where.well:
        row["well"], row["site"] = where.well, where.site
    if "c" in named:
        row["channel"] = info.channel_names[named["c"]] if info.channel_names else str(named["c"])
    return row


def _refocus_frame(
    plugin: RefocuserPlugin, job: Job, position: int, index: tuple[int, ...], row: dict[str, Any]
) -> np.ndarray | None:
    """Fill `row` for one frame; the refocused image, or None when there is none."""
    if (
        job.channels is not None
        and row.get("channel") is not None
        and index[job.info.plane_axes.index("c")] not in job.channels
    ):
        row.update(status="skipped", reason="channel not selected (--channel)")
        return None
    try:
        frame = as_plane(reader_for(job.info).read(position, index), "frame")
        if frame.shape != job.info.frame_shape:
            raise InputError(f"shape {frame.shape} differs from the dataset's {job.info.frame_shape}")
    except Exception as exc:  # noqa: BLE001 - any reader failure is this frame's failure; the others go on
        row.update(status="failed", reason=f"cannot be read: {type(exc).__name__}: {exc}")
        return None
    try:
        with plugin.lock:
            result = plugin.refocuser(frame, pixel_size_um=job.pixel_size_um)
    except InputError as exc:
        row.update(status="failed", reason=str(exc))
        return None
    sharpness = plugin.sharpness(frame, job.pixel_size_um)
    row["sharpness"] = sharpness if math.isfinite(sharpness) else None
    if not math.isfinite(result.sigma_um):
        row.update(status="skipped", reason="constant frame: nothing to refocus (an empty plane?)")
        return None
    row.update(
        status="refocused",
        defocus_magnitude_um=result.defocus_magnitude_um,
        defocus_um=result.defocus_um,
        confidence=result.confidence,
    )
    return result.image


def run_batch(job: Job, batch: Batch) -> dict[str, int]:
    """Refocus one batch on this worker: write its chunks, then its table part. Counts by status."""
    from distributed import get_worker

    plugin = get_worker().plugins[PLUGIN_NAME]
    if not isinstance(plugin, RefocuserPlugin):
        raise TypeError(f"worker plugin {PLUGIN_NAME!r} is a {type(plugin).__name__}, not the refocuser")
    rows: list[dict[str, Any]] = []
    for block in batch.blocks:
        shape = tuple(b - a for a, b in block.ranges)
        data = np.zeros((*shape, *job.info.frame_shape), np.float32) if job.store is not None else None
        for index in block.frames():
            row = _base_row(job.info, block.position, index)
            image = _refocus_frame(plugin, job, block.position, index, row)
            if image is not None and data is not None:
                data[tuple(i - a for i, (a, _) in zip(index, block.ranges, strict=True))] = image
            rows.append(row)
        if data is not None and job.store is not None:
            write_block(job.store, job.info, block, data)
    write_part(job.out, batch.number, rows, job.info)
    return dict(Counter(row["status"] for row in rows))


def run_batches(
    client: Client, job: Job, batches: Iterable[Batch], in_flight: int, on_done: Callable[[Batch, dict[str, int]], None]
) -> None:
    """Submit `batches` with at most `in_flight` queued at once (the scheduler's memory stays bounded whatever the
    dataset's size), calling `on_done` as each finishes. A batch that fails for good raises its error here."""
    from distributed import as_completed

    pending = iter(batches)
    run_token = uuid.uuid4().hex[:8]  # two runs on one cluster never share a task key
    by_key: dict[Hashable, Batch] = {}  # by the futures' keys (Dask's Key type)

    def submit(batch: Batch) -> Future[dict[str, int]]:
        future = client.submit(run_batch, job, batch, pure=False, key=f"refocus-{run_token}-batch-{batch.number}")
        by_key[future.key] = batch
        return future

    first = [submit(b) for b in itertools.islice(pending, in_flight)]
    completed = as_completed(first)
    for future in completed:
        counts = future.result()
        on_done(by_key.pop(future.key), counts)
        future.release()
        following = next(pending, None)
        if following is not None:
            completed.add(submit(following))
