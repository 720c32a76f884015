"""Benchmarks of the daemon's own costs (everything but the network): `daemon_records(sizes, repeats)`.

Three records per frame size (square uint16 frames), in the shape tools/benchmark.py collects:

* engine "hook": the acquisition thread's cost per frame, `PymmcorePlusHook.frameReady` (FrameInfo + enqueue)
  into a running pipeline. Target <= 1 ms at 2048 x 2048, so the acquisition keeps >= 95 % of its speed.
* engine "zmq-publish": raw frames through `Publisher` to a `Subscriber` on loopback TCP (and ipc://), the
  subscriber in another process; extra "gb_per_s" (pixel bytes the subscriber received per second) and
  "transport". Target >= 1 GB/s.
* engine "daemon-overhead": per frame, from `submit` until every sink (publisher with a subscriber, refocused
  OME-Zarr store, focus log, focus controller) is done, minus the time inside the engine, which is a
  pass-through here. Target p99 <= 5 ms at 2048 x 2048.

    python tools/bench_daemon.py --sizes 512 2048 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus.config import FocusConfig, PipelineConfig, PublishingConfig  # noqa: E402
from acquire_refocus.pipeline import FrameInfo, FramePipeline, FrameResult  # noqa: E402


@dataclass
class _PassThroughOutput:
    image: np.ndarray
    defocus_um: float
    confidence: float


class PassThrough:
    """The engine replaced by the identity (a float32 view of the frame): what is left is the daemon's cost."""

    engine_name = "pass-through"

    def __call__(self, frame: np.ndarray, pixel_size_um: float | None = None) -> _PassThroughOutput:
        return _PassThroughOutput(frame.astype(np.float32), 0.0, 1.0)


def _record(engine: str, size: int, times_ms: list[float], **extra: Any) -> dict[str, Any]:
    arr = np.asarray(times_ms, dtype=np.float64)
    p50 = float(np.percentile(arr, 50))
    return {
        "kind": "daemon",
        "engine": engine,
        "precision": "n/a",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "size": size,
        "batch": 1,
        "p50_ms": round(p50, 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "fps": round(1000.0 / p50, 1) if p50 > 0 else float("inf"),
        "repeats": len(times_ms),
        **extra,
    }


def bench_hook(size: int, repeats: int) -> dict[str, Any]:
    """frameReady as pymmcore-plus calls it, into a running pipeline (overflow 'latest' keeps the queue short)."""
    import useq
    from pymmcore_plus import CMMCorePlus

    from acquire_refocus.hooks.pymmcore_plus import PymmcorePlusHook

    frames = [np.random.default_rng(i).integers(0, 4000, (size, size), dtype=np.uint16) for i in range(4)]
    event = useq.MDAEvent(index={"t": 0, "p": 0}, z_pos=100.0, x_pos=0.0, y_pos=0.0)
    meta = {"position": {"x": 0.0, "y": 0.0, "z": 100.0}, "pixel_size_um": 0.325}
    pipeline = FramePipeline(PassThrough(), [], PipelineConfig(queue_size=4, overflow="latest")).start()
    hook = PymmcorePlusHook(CMMCorePlus(), pipeline)
    times = []
    try:
        for i in range(repeats + 5):
            frame = frames[i % len(frames)]
            t0 = time.perf_counter()
            hook.frameReady(frame, event, meta)
            dt = (time.perf_counter() - t0) * 1000.0
            if i >= 5:
                times.append(dt)
            time.sleep(0.002)  # a camera does not deliver back to back at 2048 px
    finally:
        pipeline.close()
    return _record("hook", size, times, target_ms=1.0)


_SUBSCRIBER = """
import json, sys, time
from acquire_refocus.client import Subscriber
address, expected, frame_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Subscriber(address, topics=("raw",), timeout_s=10.0, high_water_mark=10_000) as sub:
    print("ready", flush=True)
    received, t_last = 0, None
    while received < expected:
        message = sub.receive()
        if message is None:
            break
        if message[1] is None or message[1].nbytes != frame_bytes:
            continue  # a join probe
        t_last = time.time()
        received += 1
print(json.dumps({"received": received, "t_last": t_last}), flush=True)
"""


def bench_publish(size: int, repeats: int, address: str = "tcp://127.0.0.1:*") -> dict[str, Any]:
    """Raw frames, publisher in this process, subscriber in another process (as a viewer would be).

    Throughput = pixel bytes the subscriber received / time from the first send to its last receive."""
    import subprocess

    from acquire_refocus.publishing import Publisher

    raw = np.random.default_rng(0).integers(0, 4000, (size, size), dtype=np.uint16)
    frames_n = max(repeats, min(5000, -(-400_000_000 // raw.nbytes)))  # ~400 MB: start-up costs do not count
    publisher = Publisher(PublishingConfig(pub_address=address, high_water_mark=10_000))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUBSCRIBER, publisher.address, str(frames_n), str(raw.nbytes)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        info = FrameInfo({"t": 0}, 100.0, (0.0, 0.0), time.time(), 0.325)
        probe = FrameResult(frame=-1, raw=raw[:64, :64].copy(), info=info, status="paused")
        for _ in range(20):  # PUB/SUB joins asynchronously: probes until the subscription has arrived
            publisher.publish(probe)
            time.sleep(0.05)
        times = []
        t0 = time.time()  # the wall clock: the subscriber's last receive is timed in another process
        for i in range(frames_n):
            t = time.perf_counter()
            publisher.publish(FrameResult(frame=i, raw=raw, info=info, status="paused"))
            times.append((time.perf_counter() - t) * 1000.0)
        out, _ = proc.communicate(timeout=120)
        report = json.loads(out.strip().splitlines()[-1])
        received = report["received"]
        wall_s = (report["t_last"] - t0) if report["t_last"] else float("nan")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        publisher.close()
    gb_per_s = received * raw.nbytes / wall_s / 1e9
    return _record("zmq-publish", size, times, gb_per_s=round(gb_per_s, 3), frames_received=received,
                   frames_sent=frames_n, target_gb_per_s=1.0,
                   transport=f"{address.split(':')[0]} (loopback), subscriber in another process")


class _DoneSink:
    """Last sink: notes when each frame has been through all the others."""

    def __init__(self) -> None:
        self.done: dict[int, float] = {}
        self.engine_ms: dict[int, float] = {}
        self.event = threading.Event()

    def on_frame(self, result: FrameResult) -> None:
        self.done[result.frame] = time.perf_counter()
        self.engine_ms[result.frame] = result.engine_ms
        self.event.set()

    def close(self) -> None:
        """Nothing to release."""


def _overhead_ms(size: int, repeats: int, with_store: bool) -> tuple[list[float], list[float]]:
    """(overhead per frame, engine time per frame), one frame at a time (latency, not throughput)."""
    import useq

    from acquire_refocus.client import Subscriber
    from acquire_refocus.focus import FocusController
    from acquire_refocus.publishing import Publisher, PublishSink
    from acquire_refocus.storage import FocusLog, RefocusedStore

    n = repeats + 5
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": n})
    raw = np.random.default_rng(0).integers(0, 4000, (size, size), dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        publisher = Publisher(PublishingConfig(pub_address="tcp://127.0.0.1:*", high_water_mark=64))
        sub = Subscriber(publisher.address, topics=("raw", "refocused", "focus"), timeout_s=0.05)
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                sub.receive(0.05)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        done = _DoneSink()
        sinks: list[Any] = [FocusController(FocusConfig(mode="observe")), PublishSink(publisher)]
        if with_store:
            sinks.append(RefocusedStore(Path(tmp) / "r.ome.zarr", sequence, (size, size), 0.325))
        sinks += [FocusLog(Path(tmp) / "focus.csv"), done]
        pipeline = FramePipeline(PassThrough(), sinks, PipelineConfig(queue_size=8)).start()
        submitted: dict[int, float] = {}
        try:
            for i in range(n):
                done.event.clear()
                submitted[i] = time.perf_counter()
                pipeline.submit(raw, FrameInfo({"t": i}, 100.0, (0.0, 0.0), time.time(), 0.325))
                done.event.wait(10)
        finally:
            pipeline.close()
            stop.set()
            drainer.join(5)
            sub.close()
            publisher.close()
    frames = [i for i in range(5, n) if i in done.done]
    return ([(done.done[i] - submitted[i]) * 1000.0 - done.engine_ms[i] for i in frames],
            [done.engine_ms[i] for i in frames])


def bench_overhead(size: int, repeats: int) -> dict[str, Any]:
    """submit -> all sinks done, minus engine time. Also measured without the refocused store (extra fields
    "no_store_*"): writing float32 frames to disk is the costly sink when CPU cores are scarce."""
    overhead, engine_ms = _overhead_ms(size, repeats, with_store=True)
    no_store, _ = _overhead_ms(size, repeats, with_store=False)
    return _record("daemon-overhead", size, overhead, target_p99_ms=5.0,
                   engine_ms_p50=round(float(np.median(engine_ms)), 3),
                   no_store_p50_ms=round(float(np.percentile(no_store, 50)), 4),
                   no_store_p99_ms=round(float(np.percentile(no_store, 99)), 4),
                   sinks="focus-controller,publisher+subscriber,refocused-ome-zarr,focus-csv")


def daemon_records(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """One hook, one zmq-publish and one daemon-overhead record per size."""
    records = []
    for size in sizes:
        records.append(bench_hook(size, repeats))
        records.append(bench_publish(size, repeats))
        if sys.platform != "win32":  # a viewer on the acquisition PC itself can use ipc://
            with tempfile.TemporaryDirectory() as tmp:
                records.append(bench_publish(size, repeats, f"ipc://{tmp}/publish.ipc"))
        records.append(bench_overhead(size, repeats))
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", type=Path, help="also write the records here (JSON)")
    args = parser.parse_args()
    records = daemon_records(args.sizes, args.repeats)
    text = json.dumps(records, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
