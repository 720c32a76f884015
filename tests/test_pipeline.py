"""FramePipeline: every frame gets exactly one result, whatever the engine, the queue or the frame is like.

The engine is a real Refocuser (a small untrained network on the torch engine). To make "the engine is slower
than the camera" deterministic instead of timed, `GatedCorrector` holds the real Refocuser back until the test
has submitted every frame; `GatedSink` does the same for a slow sink behind a `BackgroundSink`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from support import GatedCorrector, Recorder

from acquire_refocus.config import PipelineConfig
from acquire_refocus.pipeline import BackgroundSink, FrameInfo, FramePipeline, FrameResult, FrameSink

pytestmark = pytest.mark.timeout(120)


def info(t: int) -> FrameInfo:
    return FrameInfo({"t": t, "p": 0}, 100.0, (0.0, 0.0), time.time(), 0.325)


def frame(seed: int, shape: tuple[int, ...] = (128, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 3000, shape, dtype=np.uint16)


def test_every_frame_is_refocused_when_the_engine_keeps_up(tiny_refocuser: Any) -> None:
    sink = Recorder()
    with FramePipeline(tiny_refocuser, [sink], PipelineConfig(queue_size=16)) as pipeline:
        frames = [frame(i) for i in range(6)]
        for i, f in enumerate(frames):
            pipeline.submit(f, info(i))
        assert pipeline.wait_idle(60)
    stats = pipeline.stats()
    assert (stats.seen, stats.refocused, stats.skipped, stats.failed, stats.delivered) == (6, 6, 0, 0, 6)
    assert sink.closed
    assert sink.thread_names == {"refocus-sinks"}  # sinks run in the dispatch thread only
    for i, f in enumerate(frames):
        result = sink.by_frame()[i]
        assert result.raw is f  # the raw frame is passed on as it came, never copied or modified
        assert result.image is not None and result.image.shape == f.shape and result.image.dtype == np.float32
        assert np.isfinite(result.defocus_um) and 0.0 <= result.confidence <= 1.0
        assert result.engine == tiny_refocuser.engine_name and result.latency_ms >= result.engine_ms > 0


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (np.full((128, 128), np.nan, np.float32), "non-finite"),
        (np.ones((2, 128, 128), np.uint16), "2-D"),
        (np.ones((128, 16), np.uint16), "smaller than"),
        (np.array([["a"] * 128] * 128), "dtype"),
        (None, "numpy array"),
    ],
)
def test_bad_frames_are_counted_and_passed_on_raw(tiny_refocuser: Any, bad: Any, reason: str) -> None:
    sink = Recorder()
    with FramePipeline(tiny_refocuser, [sink], PipelineConfig()) as pipeline:
        pipeline.submit(frame(0), info(0))
        pipeline.submit(bad, info(1))  # never raises
        pipeline.submit(frame(2), info(2))  # and the acquisition goes on
        assert pipeline.wait_idle(60)
    stats = pipeline.stats()
    assert (stats.seen, stats.refocused, stats.failed) == (3, 2, 1)
    failed = sink.by_frame()[1]
    assert failed.status == "failed" and reason in failed.reason
    assert failed.raw is bad and failed.image is None


@pytest.mark.parametrize("overflow", ["all", "latest"])
def test_engine_behind_skips_are_counted_never_silent(tiny_refocuser: Any, overflow: str) -> None:
    corrector = GatedCorrector(tiny_refocuser)
    sink = Recorder()
    pipeline = FramePipeline(corrector, [sink], PipelineConfig(queue_size=2, overflow=overflow)).start()
    try:
        pipeline.submit(frame(0), info(0))
        assert corrector.started.wait(30)  # frame 0 is in the engine, which is now stuck
        for i in range(1, 10):
            pipeline.submit(frame(i), info(i))
        corrector.gate.set()
        assert pipeline.wait_idle(60)
    finally:
        corrector.gate.set()
        stats = pipeline.close()
    results = sink.by_frame()
    assert sorted(results) == list(range(10))  # one result per frame, raw pixels always there
    refocused = sorted(i for i, r in results.items() if r.refocused)
    if overflow == "all":
        assert refocused == [0, 1, 2]  # in the engine + a full queue of 2; the rest skipped
    else:
        assert refocused == [0, 9]  # the newest frame replaced every older one waiting
    assert stats.skipped == 10 - len(refocused) and stats.refocused == len(refocused)
    for r in results.values():
        if not r.refocused:
            assert r.status == "skipped" and "engine behind" in r.reason and r.image is None
            assert r.raw is not None


def test_pause_passes_frames_raw(tiny_refocuser: Any) -> None:
    sink = Recorder()
    with FramePipeline(tiny_refocuser, [sink], PipelineConfig()) as pipeline:
        pipeline.submit(frame(0), info(0))
        pipeline.pause()
        assert pipeline.paused
        pipeline.submit(frame(1), info(1))
        pipeline.submit(frame(2), info(2))
        pipeline.resume()
        pipeline.submit(frame(3), info(3))
        assert pipeline.wait_idle(60)
    statuses = [sink.by_frame()[i].status for i in range(4)]
    assert statuses == ["refocused", "paused", "paused", "refocused"]
    assert pipeline.stats().paused_frames == 2


def test_a_failing_sink_does_not_stop_the_others(tiny_refocuser: Any) -> None:
    class Broken:
        def on_frame(self, result: FrameResult) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            raise OSError("still full")

    broken: FrameSink = Broken()
    sink = Recorder()
    with FramePipeline(tiny_refocuser, [broken, sink], PipelineConfig()) as pipeline:
        for i in range(3):
            pipeline.submit(frame(i), info(i))
        assert pipeline.wait_idle(60)
    assert len(sink.results) == 3 and sink.closed
    assert pipeline.stats().sink_errors == 4  # 3 writes and the close: a store that failed to close lost data


def test_close_without_drain_skips_what_is_queued(tiny_refocuser: Any) -> None:
    corrector = GatedCorrector(tiny_refocuser)
    sink = Recorder()
    pipeline = FramePipeline(corrector, [sink], PipelineConfig(queue_size=8)).start()
    pipeline.submit(frame(0), info(0))
    assert corrector.started.wait(30)
    for i in range(1, 5):
        pipeline.submit(frame(i), info(i))
    threading.Timer(0.5, corrector.gate.set).start()
    stats = pipeline.close(drain=False, timeout_s=60)
    assert stats.seen == 5 and stats.refocused == 1 and stats.skipped == 4
    assert len(sink.results) == 5 and sink.closed
    pipeline.submit(frame(9), info(9))  # after close: counted, never raises
    assert pipeline.stats().seen == 6


# ------------------------------------------------------------------------------------------- BackgroundSink
class GatedSink(Recorder):
    """A slow sink, deterministically: on_frame blocks until `gate` is set. Notes what happened, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()  # the first on_frame call is waiting at the gate
        self.calls: list[str] = []

    def on_frame(self, result: FrameResult) -> None:
        self.started.set()
        if not self.gate.wait(60):
            raise TimeoutError("test gate never opened")
        self.calls.append(f"frame {result.frame}")
        super().on_frame(result)

    def close(self) -> None:
        self.calls.append("close")
        super().close()


def result(i: int) -> FrameResult:
    return FrameResult(frame=i, raw=frame(i), info=info(i), status="paused", reason="paused")


def wait_until(condition: Any, what: str) -> None:
    """Wait for a state another thread reaches (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


def test_background_sink_delivers_every_result_in_order_in_its_own_thread(tiny_refocuser: Any) -> None:
    direct, behind = Recorder(), Recorder()
    background = BackgroundSink(behind, max_pending=2)
    with FramePipeline(tiny_refocuser, [direct, background], PipelineConfig(queue_size=16)) as pipeline:
        for i in range(8):
            pipeline.submit(frame(i), info(i))
        pipeline.submit(None, info(8))  # a failed frame resolves at once, ahead of queued ones
    assert len(behind.results) == 9 and behind.closed
    assert [r.frame for r in behind.results] == [r.frame for r in direct.results]  # the dispatch order
    assert all(a is b for a, b in zip(behind.results, direct.results, strict=True))  # the same results, no copies
    assert behind.thread_names == {"Recorder-writer"} and direct.thread_names == {"refocus-sinks"}
    assert (background.received, background.written, background.errors) == (9, 9, 0)
    assert background.max_depth <= 2


def test_background_sink_close_drains_the_queue_then_closes_the_wrapped_sink() -> None:
    slow = GatedSink()
    background = BackgroundSink(slow, max_pending=8)
    for i in range(5):
        background.on_frame(result(i))  # never waits: frame 0 is in the writer, 1-4 in the queue
    assert slow.started.wait(30)
    assert background.waits == 0 and slow.calls == []
    closing = threading.Event()

    def close() -> None:
        closing.set()
        background.close()

    closer = threading.Thread(target=close)
    closer.start()
    assert closing.wait(30)
    slow.gate.set()
    closer.join(60)
    assert not closer.is_alive()
    assert slow.calls == [*(f"frame {i}" for i in range(5)), "close"]  # every queued result first, then close
    assert [r.frame for r in slow.results] == list(range(5)) and background.written == 5
    background.close()  # idempotent
    assert slow.calls.count("close") == 1
    with pytest.raises(RuntimeError, match="closed"):
        background.on_frame(result(5))


def test_background_sink_close_without_frames_closes_the_wrapped_sink() -> None:
    quiet = Recorder()
    BackgroundSink(quiet).close()
    assert quiet.closed


def test_an_error_in_a_background_sink_is_counted_and_later_frames_still_written(
    tiny_refocuser: Any, engine_log: pytest.LogCaptureFixture
) -> None:
    class Flaky(Recorder):
        def on_frame(self, result: FrameResult) -> None:
            if result.frame % 2:
                raise OSError(f"disk full at frame {result.frame}")
            super().on_frame(result)

        def close(self) -> None:
            super().close()
            raise OSError("still full")

    flaky, after = Flaky(), Recorder()
    background = BackgroundSink(flaky)
    with FramePipeline(tiny_refocuser, [background, after], PipelineConfig(queue_size=16)) as pipeline:
        for i in range(6):
            pipeline.submit(frame(i), info(i))
        assert pipeline.wait_idle(60)
    assert [r.frame for r in flaky.results] == [0, 2, 4] and flaky.closed  # frames after a failure still came
    assert len(after.results) == 6 and after.closed
    assert (background.written, background.errors) == (6, 3)
    # the writer thread's 3 errors count in the pipeline's stats, and so does the failed close
    assert pipeline.stats().sink_errors == 4
    messages = [r.getMessage() for r in engine_log.records]
    assert sum("sink_failed" in m and "Flaky" in m for m in messages) == 3
    assert any("sink_close_failed" in m and "BackgroundSink" in m and "still full" in m for m in messages)


def test_a_slow_background_sink_holds_the_dispatch_back_and_drops_nothing(tiny_refocuser: Any) -> None:
    """Back-pressure: with the writer stuck and its queue full, the dispatch thread waits; every frame still
    reaches every sink once the writer moves again."""
    direct, slow = Recorder(), GatedSink()
    background = BackgroundSink(slow, max_pending=1)
    pipeline = FramePipeline(tiny_refocuser, [direct, background], PipelineConfig(queue_size=16)).start()
    try:
        pipeline.submit(frame(0), info(0))
        assert slow.started.wait(60)  # frame 0 is in the writer, stuck
        for i in range(1, 5):
            pipeline.submit(frame(i), info(i))
        # frame 1 fills the queue, frame 2 waits in the dispatch thread
        wait_until(lambda: background.waits == 1, "the dispatch thread waits for the background sink")
        assert [r.frame for r in direct.results] == [0, 1, 2]  # later frames wait behind the stuck one
        assert pipeline.stats().delivered == 2 and slow.calls == []
        slow.gate.set()
        assert pipeline.wait_idle(60)
    finally:
        slow.gate.set()
        stats = pipeline.close()
    assert stats.delivered == stats.seen == 5 and stats.refocused == 5 and stats.sink_errors == 0
    assert [r.frame for r in slow.results] == [r.frame for r in direct.results] == [0, 1, 2, 3, 4]
    assert background.waits >= 1 and background.max_depth == 1


def test_sinks_far_behind_bound_the_frames_held_in_memory(tiny_refocuser: Any, tmp_path: Any) -> None:
    """A stuck sink (a disk slower than the camera): the engine stops once max_backlog_frames results wait, and
    frames skipped meanwhile reach the sinks without pixels. Every frame still gets its result (in the order the
    results were made, as always) and its focus-log row; no more than backlog + queue + in engine + in the sink
    ever hold pixels."""
    from acquire_refocus.publishing import frame_header
    from acquire_refocus.storage import FocusLog, read_focus_log

    stuck = GatedSink()
    focus_log = FocusLog(tmp_path / "focus.csv")
    config = PipelineConfig(queue_size=2, max_backlog_frames=3)
    pipeline = FramePipeline(tiny_refocuser, [stuck, focus_log], config).start()
    try:
        pipeline.submit(frame(0), info(0))
        assert stuck.started.wait(60)  # frame 0 is in the sink, which is stuck
        for i in range(1, 30):
            pipeline.submit(frame(i), info(i))

        def settled() -> bool:  # the worker waits for room in the backlog with the queue full
            s = pipeline.stats()
            return s.in_flight == 0 and s.queue_depth + s.backlog + 1 == 30  # + frame 0, in the stuck sink

        wait_until(settled, "the worker waits for the sinks")
        held = pipeline.stats()
        assert held.backlog >= config.max_backlog_frames and held.queue_depth == config.queue_size
        stuck.gate.set()
        assert pipeline.wait_idle(60)
    finally:
        stuck.gate.set()
        stats = pipeline.close()
    results = stuck.results
    assert sorted(r.frame for r in results) == list(range(30)) and stats.delivered == 30
    with_pixels = [r for r in results if r.raw is not None]
    released = [r for r in results if r.raw is None]
    assert len(with_pixels) <= config.max_backlog_frames + config.queue_size + 2, [r.frame for r in with_pixels]
    assert len(released) == stats.pixels_released == held.pixels_released >= 30 - 7
    assert all(r.status == "skipped" and r.image is None for r in released)
    assert all(r.image is not None for r in results if r.refocused)
    assert stats.refocused + stats.skipped == 30
    assert sorted(row["frame"] for row in read_focus_log(tmp_path / "focus.csv")) == list(range(30))
    header = frame_header(released[0], "focus", None)
    assert header["shape"] is None and header["status"] == "skipped"
