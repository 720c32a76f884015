"""Benchmark of `correct DATASET` (acquire_refocus.reprocess) against calling the Refocuser in a loop.

For each frame size: an OME-Zarr written with ome-writers (as the daemon's raw store), the shipped model on the
engine `auto` picks. Measured, interleaved in one run:
  loop       one process: read each frame from the store, call Refocuser (all cores), no output written;
  dask Nw    an embedded LocalCluster of N worker processes (the cores shared out), the real task: read, refocus,
             write the refocused chunks and the table part. Timed after every worker has loaded the model and done
             one batch (steady state: cluster start and model loading are a one-off per run, reported apart).
Prints frames/s, the overhead of the distributed path against the loop, and a paper estimate for a plate.

    python tools/bench_reprocess.py --sizes 512 2048 --frames 48 8 --batch-frames 4 1 --workers 1 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PLATE_IMAGES = 100_000


def _dataset(folder: Path, size_px: int, frames: int) -> Path:
    import reprocess_data as data

    source = data.frames_tpcz(frames, 1, 1, 1, px=size_px)
    path = folder / f"raw-{size_px}.ome.zarr"
    data.write_ome_writers(path, source, pixel_size_um=0.325)  # the shipped model's: frames are not resampled
    return path


def _loop(dataset: Path, threads: int) -> float:
    """Frames per second of Refocuser in a loop over the store's frames."""
    from acquire_refocus.config import EngineConfig
    from acquire_refocus.refocuser import Refocuser
    from acquire_refocus.reprocess.dataset import open_dataset, open_reader

    info = open_dataset(dataset)
    reader = open_reader(info)
    refocuser = Refocuser.load(None, engine=EngineConfig(backend="auto", num_threads=threads))
    frames = list(info.frames())
    refocuser(reader.read(*frames[0]), pixel_size_um=info.pixel_size_um)  # warm-up
    start = time.perf_counter()
    for position, index in frames[1:]:
        refocuser(reader.read(position, index), pixel_size_um=info.pixel_size_um)
    elapsed = time.perf_counter() - start
    reader.close()
    return (len(frames) - 1) / elapsed


def _dask(dataset: Path, out: Path, workers: int, batch_frames: int) -> tuple[float, float]:
    """(steady frames/s, seconds to start the cluster and load the model in every worker)."""
    from acquire_refocus.reprocess import table
    from acquire_refocus.reprocess.batches import plan_batches
    from acquire_refocus.reprocess.cluster import dask_client, worker_threads
    from acquire_refocus.reprocess.dataset import open_dataset
    from acquire_refocus.reprocess.output import create_store
    from acquire_refocus.reprocess.work import PLUGIN_NAME, Job, RefocuserPlugin, run_batches

    info = open_dataset(dataset)
    out.mkdir()
    (out / table.PARTS).mkdir()
    create_store(info, out / "refocused.ome.zarr")
    job = Job(info=info, out=out, store=out / "refocused.ome.zarr", channels=None, pixel_size_um=info.pixel_size_um)
    batches = plan_batches(info, batch_frames)
    start = time.perf_counter()
    with dask_client(None, workers) as client:
        client.register_plugin(RefocuserPlugin(None, "auto", None), name=PLUGIN_NAME)
        warm = batches[:workers]  # one batch per worker: each loads its model and runs once
        run_batches(client, job, warm, len(warm), lambda b, c: None)
        startup_s = time.perf_counter() - start
        rest = batches[workers:]
        begin = time.perf_counter()
        run_batches(client, job, rest, 2 * worker_threads(client), lambda b, c: None)
        elapsed = time.perf_counter() - begin
    return sum(b.size for b in rest) / elapsed, startup_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--frames", type=int, nargs="+", default=[48, 8], help="frames per size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-frames", type=int, nargs="+", default=[4, 1], help="per size")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from acquire_refocus.reprocess.cluster import machine_cores

    cores = machine_cores()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        for size, frames, batch_frames in zip(args.sizes, args.frames, args.batch_frames, strict=True):
            if frames < (max(args.workers) + 2) * batch_frames:
                parser.error(
                    f"{size} px: give at least (workers + 2) x batch frames, so batches remain after the warm-up"
                )
            dataset = _dataset(folder, size, frames)
            loop_before = _loop(dataset, cores)
            row: dict[str, Any] = {"size_px": size, "frames": frames, "batch_frames": batch_frames}
            for workers in args.workers:
                fps, startup_s = _dask(dataset, folder / f"out-{size}-{workers}", workers, batch_frames)
                row[f"dask_{workers}w_fps"] = fps
                row[f"dask_{workers}w_startup_s"] = startup_s
            loop_after = _loop(dataset, cores)  # the loop before and after: the machine's load drifts
            row["loop_fps"] = (loop_before + loop_after) / 2
            row["loop_fps_before_after"] = [loop_before, loop_after]
            for workers in args.workers:
                row[f"dask_{workers}w_overhead"] = row["loop_fps"] / row[f"dask_{workers}w_fps"] - 1
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{cores} cores. frames/s (overhead against the loop; start-up once per run):")
    for row in results:
        before, after = row["loop_fps_before_after"]
        parts = [f"{row['size_px']}²: loop {row['loop_fps']:.2f} ({before:.2f} before, {after:.2f} after)"]
        for workers in args.workers:
            parts.append(
                f"{workers} worker(s) {row[f'dask_{workers}w_fps']:.2f} "
                f"({100 * row[f'dask_{workers}w_overhead']:+.0f} %, "
                f"start {row[f'dask_{workers}w_startup_s']:.1f} s)"
            )
        print("  " + "; ".join(parts))
    print(f"\nPaper estimate, a {PLATE_IMAGES:,}-image plate, N machines like this one (best layout measured):")
    for row in results:
        best = max(row[f"dask_{w}w_fps"] for w in args.workers)
        hours = [PLATE_IMAGES / (best * n) / 3600 for n in (1, 8, 32, 128)]
        estimates = zip((1, 8, 32, 128), hours, strict=True)
        print(f"  {row['size_px']}²: " + ", ".join(f"N={n}: {h:.2f} h" for n, h in estimates))
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
