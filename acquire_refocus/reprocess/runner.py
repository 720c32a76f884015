"""One reprocessing run, start to end: describe the dataset, check every option and the output folder before any
work, create the outputs, compute the batches not yet done on the cluster, merge the focus table.

A rerun of the same command into the same DIR resumes: `DIR/reprocess.json` records what the run is (dataset,
channels, pixel size, model, images or not, batch size) and a rerun with anything different is refused; batches
whose table part exists are skipped; a finished run (focus.parquet present) is reported as such and not redone.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acquire_refocus.errors import InputError, UserError
from acquire_refocus.logs import kv
from acquire_refocus.outputs import output_folder
from acquire_refocus.reprocess import table
from acquire_refocus.reprocess.batches import Batch, plan_batches
from acquire_refocus.reprocess.dataset import DatasetInfo, open_dataset, select_channels

log = logging.getLogger(__name__)

RECORD = "reprocess.json"
STORE = "refocused.ome.zarr"
OUR_NAMES = (RECORD, STORE, table.TABLE, table.CSV, table.PARTS)


@dataclass(frozen=True)
class Options:
    dataset: Path
    out: Path
    weights: Path | None = None
    engine: str = "auto"
    pixel_size_um: float | None = None
    channels: tuple[str, ...] = ()
    images: bool = True
    csv: bool = False
    scheduler: str | None = None
    workers: int | None = None
    batch_frames: int = 8


@dataclass
class Summary:
    info: DatasetInfo
    out: Path
    frames: int
    frames_before: int  # frames an earlier, interrupted run had finished
    frames_computed: int  # frames this run computed
    counts: Counter[str] = field(default_factory=Counter)
    already_complete: bool = False
    dashboard: str | None = None


def _check_out(dataset: Path, out: Path) -> None:
    source, target = dataset.resolve(), out.resolve()
    if target == source or source in target.parents:
        raise UserError(
            f"--out {out} is inside the dataset {dataset}; results go beside the input, never into it: "
            "choose another --out"
        )


def _pixel_size_um(info: DatasetInfo, given: float | None) -> float:
    size = given if given is not None else info.pixel_size_um
    if size is None:
        raise InputError(
            f"{info.path}: the dataset's metadata gives no pixel size; give it with --pixel-size-um "
            "(micrometres at the sample)"
        )
    return size


def _identity(opts: Options, info: DatasetInfo, pixel_size_um: float, model_sha256: str) -> dict[str, Any]:
    return {
        "dataset": str(opts.dataset.resolve()),
        "format": info.kind,
        "frames": info.frame_count,
        "channels": list(opts.channels),
        "pixel_size_um": pixel_size_um,
        "model_sha256": model_sha256,
        "images": opts.images,
        "batch_frames": opts.batch_frames,
    }


def _start_or_resume(opts: Options, info: DatasetInfo, identity: dict[str, Any]) -> bool:
    """Create the run's record and outputs, or check that DIR holds this very run. True when it is complete."""
    from acquire_refocus.reprocess.output import create_store

    record = opts.out / RECORD
    if record.is_file():
        try:
            earlier = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--out {opts.out}: {record} cannot be read ({exc}); choose another --out") from None
        differs = sorted(k for k in identity if earlier.get(k) != identity[k])
        if differs:
            raise UserError(
                f"--out {opts.out} holds a run with other settings ({', '.join(differs)} differ); rerun "
                "the same command to resume it, or choose another --out"
            )
        if (opts.out / table.TABLE).is_file():
            return True
    else:
        taken = [str(opts.out / n) for n in OUR_NAMES if (opts.out / n).exists()]
        if taken:
            raise UserError(
                f"--out {opts.out} already holds {', '.join(taken)} of another run; results are never "
                "written over existing files: choose another --out"
            )
    try:
        if not record.is_file():  # first, so that whatever follows belongs to this run and a rerun resumes it
            temp = opts.out / f".{RECORD}.tmp"
            temp.write_text(json.dumps(identity, indent=2) + "\n")
            os.replace(temp, record)
        if opts.images and not (opts.out / STORE).exists():
            create_store(info, opts.out / STORE)
        (opts.out / table.PARTS).mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {opts.out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
    return False


def reprocess(opts: Options) -> Summary:
    from acquire_refocus.model.checkpoint import load_weights
    from acquire_refocus.refocuser import check_pixel_size_um

    info = open_dataset(opts.dataset)
    channels = select_channels(info, list(opts.channels))
    pixel_size_um = _pixel_size_um(info, opts.pixel_size_um)
    loaded = load_weights(opts.weights)
    check_pixel_size_um(pixel_size_um, loaded.pixel_size_um)  # the rule every frame would fail on
    _check_out(opts.dataset, opts.out)
    output_folder(opts.out, "--out")
    identity = _identity(opts, info, pixel_size_um, loaded.sha256)
    summary = Summary(info=info, out=opts.out, frames=info.frame_count, frames_before=0, frames_computed=0)
    if _start_or_resume(opts, info, identity):
        summary.already_complete = True
        summary.frames_before = info.frame_count
        return summary
    batches = plan_batches(info, opts.batch_frames)
    done = table.done_batches(opts.out)
    remaining = [b for b in batches if b.number not in done]
    summary.frames_before = sum(b.size for b in batches if b.number in done)
    log.info(
        kv(
            "reprocess_start",
            dataset=opts.dataset,
            format=info.kind,
            frames=info.frame_count,
            batches=len(batches),
            done_before=len(done),
            out=opts.out,
        )
    )
    if remaining:
        _compute(opts, info, channels, pixel_size_um, remaining, summary)
    merged = table.merge(opts.out, info, opts.csv)
    summary.counts = Counter(merged.column("status").to_pylist())
    return summary


def _compute(
    opts: Options,
    info: DatasetInfo,
    channels: tuple[int, ...] | None,
    pixel_size_um: float,
    remaining: list[Batch],
    summary: Summary,
) -> None:
    from distributed import KilledWorker
    from tqdm import tqdm

    from acquire_refocus.reprocess.cluster import dask_client, worker_threads
    from acquire_refocus.reprocess.work import PLUGIN_NAME, Job, RefocuserPlugin, run_batches

    job = Job(
        info=info,
        out=opts.out,
        store=opts.out / STORE if opts.images else None,
        channels=channels,
        pixel_size_um=pixel_size_um,
    )
    with dask_client(opts.scheduler, opts.workers) as client:
        summary.dashboard = (
            client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
        )
        if summary.dashboard:
            print(f"Dask dashboard: {summary.dashboard}", file=sys.stderr)
        client.register_plugin(RefocuserPlugin(opts.weights, opts.engine, None), name=PLUGIN_NAME)
        progress = tqdm(
            total=sum(b.size for b in remaining), unit="frame", desc="refocus", file=sys.stderr, disable=None
        )

        def done(batch: Batch, counts: dict[str, int]) -> None:
            summary.frames_computed += batch.size
            progress.update(batch.size)

        try:
            run_batches(client, job, remaining, 2 * worker_threads(client), done)
        except KilledWorker as exc:
            raise UserError(
                f"a batch was lost with its worker {exc.last_worker} more often than Dask allows "
                f"({exc}); finished batches are kept: rerun the same command to resume"
            ) from None
        finally:
            progress.close()
