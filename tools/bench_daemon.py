"""Benchmarks of the daemon's own costs (everything but the network): `daemon_records(sizes, repeats)`.

Three records per frame size (square uint16 frames), in the shape tools/benchmark.py collects:

* engine "hook": the acquisition thread's cost per frame, `PymmcorePlusHook.frameReady` (FrameInfo + enqueue)
  into a running pipeline. Target <= 1 ms at 2048 x 2048, so the acquisition keeps >= 95 % of its speed.
* engine "zmq-publish": raw frames through `Publisher` to a `Subscriber` on loopback TCP (and ipc://), the
  subscriber in another process; extra "gb_per_s" (pixel bytes the subscriber received per second) and
  "transport". Target >= 1 GB/s.
* engine "sharpness": the focus controller's image-sharpness measure alone (`focus.fine_source: sharpness`, on
  in the shipped configs), one FFT of a central crop of at most 512 x 512.
* engine "daemon-overhead": per frame, from `submit` until the latency-critical sinks (focus controller with
  `fine_source: sharpness`, publisher with a subscriber, focus log) are done, minus the time inside the engine,
  which is a pass-through here. The real refocused OME-Zarr store is attached as in the daemon, behind its
  writer thread (`BackgroundSink`): off the latency path, still competing for the CPU. Target p99 <= 5 ms at
  2048 x 2048.
  Frames go one at a time at the camera rate ("frame_interval_ms": 100 fps at 2048 px). Extra fields:
  - "focus_ready_*": submit until the focus controller has the estimate; "sharpness_ready_*": until its own
    thread has measured the frame's sharpness too (the closed loop waits for both between time points);
    "after_focus_*": from there until the latency-critical sinks are done (the dispatch thread's own work,
    publisher and focus log: what the sink order and the store's writer thread change; on a busy machine the
    totals are dominated by threads waiting for a core);
  - "store_write_*": the store's own time per frame in its writer thread (the `on_frame` call), and
    "store_commit_*": from that call until ome-writers' tensorstore backend, which writes asynchronously in
    tensorstore's threads, has committed the frame to disk;
  - "store_kept_up", "store_waits", "store_max_depth": whether the writer kept up (how often the dispatch
    thread found its queue full and had to wait), "store_frames_written" of "store_frames_expected";
  - "synchronous_store_*": the previous path in the same run, the store called in the dispatch thread before
    the focus log; "no_store_*": no refocused store at all. The variants run interleaved ("rounds").

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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import PassThrough  # the engine replaced by the identity: what is left is the daemon's cost

from acquire_refocus.config import FocusConfig, PipelineConfig, PublishingConfig
from acquire_refocus.pipeline import BackgroundSink, FrameInfo, FramePipeline, FrameResult, FrameSink

CAMERA_RATE_FPS = {2048: 100.0, 1024: 200.0, 512: 400.0}  # as in tools/benchmark.py: the rate frames arrive at


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


def bench_sharpness(size: int, repeats: int) -> dict[str, Any]:
    """The sharpness measure on a uint16 frame, as the focus controller's own thread calls it."""
    from acquire_refocus.config import OpticsConfig
    from acquire_refocus.sharpness import BandPassSharpness

    measure = BandPassSharpness.for_optics(OpticsConfig())
    frame = np.random.default_rng(0).integers(0, 4000, (size, size), dtype=np.uint16)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        measure(frame, 0.325)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000.0)
    return _record("sharpness", size, times, crop_px=min(size, measure.crop_px))


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
        stdout=subprocess.PIPE,
        text=True,
        env=env,
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
    return _record(
        "zmq-publish",
        size,
        times,
        gb_per_s=round(gb_per_s, 3),
        frames_received=received,
        frames_sent=frames_n,
        target_gb_per_s=1.0,
        transport=f"{address.split(':')[0]} (loopback), subscriber in another process",
    )


class _Mark:
    """A sink that notes when each frame has been through the sinks before it."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.engine_ms: dict[int, float] = {}
        self.event = threading.Event()

    def on_frame(self, result: FrameResult) -> None:
        self.at[result.frame] = time.perf_counter()
        self.engine_ms[result.frame] = result.engine_ms
        self.event.set()

    def close(self) -> None:
        """Nothing to release."""


class _Timed:
    """Wraps the refocused store: how long each on_frame call took, and when ome-writers' tensorstore backend,
    which writes asynchronously in tensorstore's own threads, finished committing that frame (through the store's
    view of the backend's write futures: without one only the call times are kept)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.call_ms: list[float] = []
        self.commit_ms: dict[int, float] = {}  # by call, from the start of the call

    def on_frame(self, result: FrameResult) -> None:
        futures = self.store._write_futures()  # noqa: SLF001 - measures the store's own write bound
        before = {id(f) for f in futures} if futures is not None else set()
        call, t0 = len(self.call_ms), time.perf_counter()
        self.store.on_frame(result)
        self.call_ms.append((time.perf_counter() - t0) * 1000.0)
        if futures is None:
            return
        new = [f for f in futures if id(f) not in before]
        if new:
            new[-1].add_done_callback(lambda _f: self._committed(call, t0))
        elif result.image is not None:  # already on disk: the store let go of its finished write
            self._committed(call, t0)

    def _committed(self, call: int, t0: float) -> None:
        self.commit_ms[call] = (time.perf_counter() - t0) * 1000.0  # in a tensorstore thread

    def close(self) -> None:
        self.store.close()


def _percentiles(values: list[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"{prefix}_p50_ms": None, f"{prefix}_p99_ms": None}
    return {
        f"{prefix}_p50_ms": round(float(np.percentile(values, 50)), 4),
        f"{prefix}_p99_ms": round(float(np.percentile(values, 99)), 4),
    }


_WARM_UP = 5  # frames per run left out of the statistics


def _overhead_run(size: int, frames: int, store: str) -> dict[str, Any]:
    """`frames` frames (after the warm-up) one at a time at the camera rate: latency, not throughput.

    store: "background" (the daemon's path: focus controller, publisher, focus log, then the store behind its
    writer thread), "synchronous" (the previous path: focus controller, publisher, store, focus log, all in the
    dispatch thread) or "none". Per-frame lists: "overhead" (submit -> latency-critical sinks done, minus engine
    time), "focus" (submit -> focus controller done, minus engine time), "after_focus" (focus controller done ->
    latency-critical sinks done), "engine", "store_call", "store_commit"; and the writer's counts."""
    import useq

    from acquire_refocus.client import Subscriber
    from acquire_refocus.focus import FocusController
    from acquire_refocus.publishing import Publisher, PublishSink
    from acquire_refocus.storage import FocusLog, RefocusedStore

    n = frames + _WARM_UP
    interval_s = 1.0 / CAMERA_RATE_FPS.get(size, min(400.0, 100.0 * (2048 / size) ** 2))
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": n})
    raw = np.random.default_rng(0).integers(0, 4000, (size, size), dtype=np.uint16)
    background: BackgroundSink | None = None
    with tempfile.TemporaryDirectory() as tmp:
        publisher = Publisher(PublishingConfig(pub_address="tcp://127.0.0.1:*", high_water_mark=64))
        sub = Subscriber(publisher.address, topics=("raw", "refocused", "focus"), timeout_s=0.05)
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                sub.receive(0.05)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        focus, done = _Mark(), _Mark()
        controller = FocusController(FocusConfig(mode="observe", fine_source="sharpness"))
        latency_critical: list[FrameSink] = [controller, focus, PublishSink(publisher)]
        focus_log = FocusLog(Path(tmp) / "focus.csv")
        timed = (
            _Timed(RefocusedStore(Path(tmp) / "r.ome.zarr", sequence, (size, size), 0.325)) if store != "none" else None
        )
        sinks: list[FrameSink]
        if timed is None:
            sinks = [*latency_critical, focus_log, done]
        elif store == "synchronous":
            sinks = [*latency_critical, timed, focus_log, done]
        else:
            background = BackgroundSink(timed)
            sinks = [*latency_critical, focus_log, done, background]
        pipeline = FramePipeline(PassThrough(), sinks, PipelineConfig(queue_size=8)).start()
        submitted: dict[int, float] = {}
        measured_at: dict[int, float] = {}
        try:
            t_next = time.perf_counter()
            for i in range(n):
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next = max(t_next + interval_s, time.perf_counter())  # late: no burst to catch up
                done.event.clear()
                submitted[i] = time.perf_counter()
                pipeline.submit(raw, FrameInfo({"t": i}, 100.0, (0.0, 0.0), time.time(), 0.325))
                done.event.wait(10)
                if controller.wait_for_frames(i + 1, 10):
                    measured_at[i] = time.perf_counter()
        finally:
            pipeline.close()
            stop.set()
            drainer.join(5)
            sub.close()
            publisher.close()
    kept = [i for i in range(_WARM_UP, n) if i in done.at]
    return {
        "overhead": [(done.at[i] - submitted[i]) * 1000.0 - done.engine_ms[i] for i in kept],
        "focus": [(focus.at[i] - submitted[i]) * 1000.0 - focus.engine_ms[i] for i in kept],
        "after_focus": [(done.at[i] - focus.at[i]) * 1000.0 for i in kept],
        "sharpness": [(measured_at[i] - submitted[i]) * 1000.0 - done.engine_ms[i] for i in kept if i in measured_at],
        "engine": [done.engine_ms[i] for i in kept],
        "store_call": timed.call_ms[_WARM_UP:] if timed is not None else [],
        "store_commit": [ms for call, ms in timed.commit_ms.items() if call >= _WARM_UP] if timed is not None else [],
        "store_frames": len(timed.call_ms) if timed is not None else 0,
        "frame_interval_ms": round(interval_s * 1000.0, 3),
        "waits": background.waits if background is not None else 0,
        "max_depth": background.max_depth if background is not None else 0,
        "max_pending": background.max_pending if background is not None else 0,
        "errors": background.errors if background is not None else 0,
    }


def bench_overhead(size: int, repeats: int, rounds: int = 5) -> dict[str, Any]:
    """submit -> latency-critical sinks done, minus engine time, with the refocused store behind its writer thread;
    the same for the previous synchronous path ("synchronous_store_*") and without the store ("no_store_*").
    The three run interleaved, `rounds` times each (order rotating), so load from other processes hits them
    alike."""
    variants = ("background", "synchronous", "none")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    rounds = max(1, min(rounds, repeats))
    per_round = -(-repeats // rounds)
    for r in range(rounds):
        for k in range(len(variants)):
            variant = variants[(r + k) % len(variants)]
            runs[variant].append(_overhead_run(size, per_round, variant))

    def joined(variant: str, key: str) -> list[float]:
        return [x for run in runs[variant] for x in run[key]]

    new = runs["background"]
    waits = sum(run["waits"] for run in new)
    return _record(
        "daemon-overhead",
        size,
        joined("background", "overhead"),
        target_p99_ms=5.0,
        engine_ms_p50=round(float(np.median(joined("background", "engine"))), 3),
        frame_interval_ms=new[0]["frame_interval_ms"],
        **_percentiles(joined("background", "focus"), "focus_ready"),
        **_percentiles(joined("background", "sharpness"), "sharpness_ready"),
        **_percentiles(joined("background", "after_focus"), "after_focus"),
        **_percentiles(joined("background", "store_call"), "store_write"),
        **_percentiles(joined("background", "store_commit"), "store_commit"),
        store_kept_up=waits == 0,
        store_waits=waits,
        store_max_depth=max(run["max_depth"] for run in new),
        store_max_pending=new[0]["max_pending"],
        store_frames_written=sum(run["store_frames"] for run in new),
        store_frames_expected=rounds * (per_round + _WARM_UP),
        store_errors=sum(run["errors"] for run in new),
        **_percentiles(joined("synchronous", "overhead"), "synchronous_store"),
        **_percentiles(joined("synchronous", "focus"), "synchronous_store_focus_ready"),
        **_percentiles(joined("synchronous", "after_focus"), "synchronous_store_after_focus"),
        **_percentiles(joined("synchronous", "store_call"), "synchronous_store_write"),
        **_percentiles(joined("none", "overhead"), "no_store"),
        rounds=rounds,
        sinks="focus-controller,publisher+subscriber,focus-csv; refocused-ome-zarr in a writer thread",
    )


def daemon_records(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """One hook, one sharpness, zmq-publish (tcp, ipc) and one daemon-overhead record per size."""
    records = []
    for size in sizes:
        records.append(bench_hook(size, repeats))
        records.append(bench_sharpness(size, repeats))
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
