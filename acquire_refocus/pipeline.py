"""From the acquisition thread to the engine to the sinks, without ever holding the acquisition back.

Three threads take part:

* the acquisition thread calls `FramePipeline.submit` for every raw frame. It only appends to in-memory queues
  (no I/O, no locks held for long, no copies), so the camera runs at full speed whatever happens downstream;
* the worker thread takes frames from the bounded correction queue and runs the corrector (a `Refocuser`);
* the dispatch thread hands every result to the sinks in turn, latency-critical ones first (the daemon's
  order: focus controller, publisher, focus log, then the refocused store). Sinks may block on disk or on the
  network: only this thread waits for them, and it alone owns whatever the sinks own (a ZeroMQ socket is not
  thread-safe, so the publisher's socket lives here). A sink slow enough to hold the others up (the refocused
  store: 16 MB of float32 per 2048 x 2048 frame) is wrapped in a `BackgroundSink`, its own writer thread behind
  a small bounded queue, so neither the closed focus loop nor the next frame's publish waits for the disk.

Every submitted frame produces exactly one `FrameResult`, whatever happened to it: `refocused`, `skipped` (the
engine was behind: the queue was full, or a newer frame replaced it with overflow "latest"), `failed` (a frame the
engine cannot take: wrong dtype or shape, non-finite values, an engine error) or `paused`. Frames that are not
refocused still reach the sinks with their raw pixels, so nothing is dropped silently: they are counted, logged,
published raw and get a focus-log row. Raw frames are saved by the acquisition backend's own writer, never here.

Memory is bounded when the sinks fall behind (a disk slower than the camera): once `max_backlog_frames` results
wait for the sinks, the worker stops taking frames (the correction queue fills and its overflow policy skips, as
when the engine is slow), and frames skipped meanwhile reach the sinks without their pixels (`raw` is None,
counted as `pixels_released`): still counted, logged and in the focus log, but not published raw.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from acquire_refocus.config import PipelineConfig
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)

FrameStatus = Literal["refocused", "skipped", "failed", "paused"]
MIN_FRAME_SIZE_PX = 64


@dataclass(frozen=True)
class FrameInfo:
    """What the acquisition knows about a frame when it is taken."""

    axes: dict[str, int]  # useq indices, e.g. {"t": 3, "p": 0, "z": 0}
    stage_z_um: float | None
    stage_xy_um: tuple[float, float] | None
    t_acquired: float  # unix time
    pixel_size_um: float | None
    channel: str | None = None  # the channel preset's name (None: the acquisition has no channels)
    channel_z_offset_um: float = 0.0  # the channel's Z offset in the sequence: its focus lies at stage Z - this


@dataclass
class FrameResult:
    """One raw frame and what became of it. `raw` is the frame as acquired (never modified)."""

    frame: int  # running index over the pipeline's lifetime, in submission order
    raw: np.ndarray | None  # None: released because the sinks were behind (PipelineConfig.max_backlog_frames)
    info: FrameInfo
    status: FrameStatus
    image: np.ndarray | None = None  # refocused frame, float32, the raw frame's intensity units
    defocus_um: float = math.nan
    confidence: float = math.nan
    defocus_magnitude_um: float = math.nan  # unsigned estimate, see Refocuser
    reason: str = ""  # why the frame was not refocused
    flags: tuple[str, ...] = ()  # the frame lies outside the model's envelope (Refocuser, model/envelope.py)
    engine: str = ""
    engine_ms: float = 0.0
    latency_ms: float = 0.0  # from submit to the result being ready for the sinks
    model_sha256: str = ""  # the weights that refocused the frame (per channel: model.weights_per_channel)

    @property
    def refocused(self) -> bool:
        return self.status == "refocused"


class RefocusOutput(Protocol):
    """What a corrector returns. It may also carry `defocus_magnitude_um` (the unsigned estimate, as Refocuser
    does); without it, focus.sign_source: probe has nothing to work from and ignores the frame. Read-only, so
    that a frozen dataclass (Refocuser's RefocusResult) is one."""

    @property
    def image(self) -> np.ndarray: ...
    @property
    def defocus_um(self) -> float: ...
    @property
    def confidence(self) -> float: ...


class FrameCorrector(Protocol):
    """What the worker runs on each frame; `acquire_refocus.Refocuser` is one."""

    @property
    def engine_name(self) -> str: ...

    def __call__(self, frame: np.ndarray, pixel_size_um: float | None = None) -> RefocusOutput: ...


class ChannelPolicy(Protocol):
    """Why frames of this channel are not given to the network (published and logged raw, status skipped), or
    None to refocus them."""

    def __call__(self, channel: str | None) -> str | None: ...


class FocusOffsetLookup(Protocol):
    """The Z offset the closed focus loop applied to the frames with these acquisition axes (its correction plus
    any dither; 0 when it only observes), None when it planned nothing for them. Used by the sinks that report it."""

    def __call__(self, axes: dict[str, int]) -> float | None: ...


@runtime_checkable
class FrameSink(Protocol):
    """Receives every result in the dispatch thread (like pymmcore-plus's SinkProtocol, one call per frame).

    `on_frame` may block (disk, network); it only delays later results and the sinks after it, never the
    acquisition (wrap a slow sink in `BackgroundSink` to keep it off the other sinks' path). An exception in a
    sink is logged and counted; the other sinks still get the frame. `close` is called once, at the end, in the
    dispatch thread.
    """

    def on_frame(self, result: FrameResult) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PipelineStats:
    """Counts since the pipeline started. seen = refocused + skipped + failed + paused + queued + in flight."""

    seen: int
    refocused: int
    skipped: int
    failed: int
    paused_frames: int
    queue_depth: int
    in_flight: int
    delivered: int  # results handed to the sinks (a BackgroundSink may still be writing them until close)
    backlog: int  # results waiting for the sinks
    pixels_released: int  # skipped frames whose pixels were let go because the sinks were behind
    sink_errors: int  # exceptions in sinks, those in BackgroundSinks' writer threads included
    paused: bool
    engine: str
    overflow: str
    queue_size: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Pending:
    frame: int
    raw: np.ndarray
    info: FrameInfo
    t_submit: float  # perf_counter


def frame_problem(frame: Any) -> str | None:
    """Why a frame cannot be refocused, or None when it can. Cheap checks first, the finite check last."""
    if not isinstance(frame, np.ndarray):
        return f"expected a numpy array, got {type(frame).__name__}"
    if frame.ndim != 2:
        return f"expected a 2-D frame (height, width), got shape {frame.shape}"
    if frame.dtype.kind not in "uif" or frame.dtype.itemsize > 8:
        return f"expected an integer or float frame, got dtype {frame.dtype}"
    if min(frame.shape) < MIN_FRAME_SIZE_PX:
        return f"frame {frame.shape[1]}x{frame.shape[0]} px is smaller than {MIN_FRAME_SIZE_PX}x{MIN_FRAME_SIZE_PX}"
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        return "frame has non-finite values (NaN or inf)"
    return None


@dataclass
class _Counts:
    seen: int = 0
    refocused: int = 0
    skipped: int = 0
    failed: int = 0
    paused: int = 0
    delivered: int = 0
    pixels_released: int = 0
    sink_errors: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)


class FramePipeline:
    """Bounded correction queue + worker + dispatch to sinks. Use as a context manager, or start()/close().

    `submit` keeps a reference to the frame: the caller must not reuse the array's buffer afterwards (Micro-Manager
    cores, pymmcore-plus and pycromanager hand out a fresh array per frame).
    """

    def __init__(
        self,
        corrector: FrameCorrector,
        sinks: list[FrameSink] | tuple[FrameSink, ...] = (),
        config: PipelineConfig | None = None,
        channel_policy: ChannelPolicy | None = None,
        channel_correctors: Mapping[str, FrameCorrector] | None = None,
    ) -> None:
        """`channel_correctors`: the corrector of each channel that has its own model (model.weights_per_channel);
        frames of other channels go to `corrector`. All run on the worker thread."""
        self._corrector = corrector
        self._channel_correctors = dict(channel_correctors or {})
        self._channel_policy = channel_policy
        self._sinks: list[FrameSink] = list(sinks)
        self._config = config or PipelineConfig()
        self._engine_name = str(getattr(corrector, "engine_name", type(corrector).__name__))
        self._lock = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._results: deque[FrameResult] = deque()
        self._counts = _Counts()
        self._in_flight = 0
        self._paused = False
        self._accepting = False
        self._stopping = False  # worker: finish (drain or abandon) and exit
        self._abandon = False  # close(drain=False): remaining queued frames are skipped
        self._worker_finished = False
        self._worker: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._last_skip_log = 0.0
        self._last_release_log = 0.0

    # ----------------------------------------------------------------- lifecycle
    def add_sink(self, sink: FrameSink) -> None:
        """Add a sink before start()."""
        if self._worker is not None:
            raise RuntimeError("add sinks before the pipeline starts")
        self._sinks.append(sink)

    def start(self) -> FramePipeline:
        if self._worker is not None:
            return self
        self._accepting = True
        self._worker = threading.Thread(target=self._work, name="refocus-worker", daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch, name="refocus-sinks", daemon=True)
        self._worker.start()
        self._dispatcher.start()
        log.info(
            kv(
                "pipeline_started",
                engine=self._engine_name,
                queue_size=self._config.queue_size,
                overflow=self._config.overflow,
                sinks=",".join(type(s).__name__ for s in self._sinks) or "none",
            )
        )
        return self

    def close(self, drain: bool = True, timeout_s: float = 60.0) -> PipelineStats:
        """Stop accepting frames, finish the queue (or skip what is left when drain is False or time runs out),
        deliver every result, close the sinks. Idempotent; returns the final counts."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._abandon = self._abandon or not drain
            self._lock.notify_all()
        deadline = time.monotonic() + timeout_s
        if self._worker is not None:
            self._worker.join(max(0.0, deadline - time.monotonic()))
            if self._worker.is_alive():
                # The engine is still busy with one frame: skip the rest so the sinks can close.
                with self._lock:
                    self._abandon = True
                    self._lock.notify_all()
                self._worker.join(max(1.0, deadline - time.monotonic()))
        if self._dispatcher is not None:
            self._dispatcher.join(max(1.0, deadline - time.monotonic()))
            if self._dispatcher.is_alive():
                log.error(kv("pipeline_close_timeout", waited_s=timeout_s, note="a sink is still blocked"))
        elif self._sinks:  # never started: the sinks still hold open files
            self._close_sinks()
            self._sinks = []
        stats = self.stats()
        log.info(kv("pipeline_closed", **{k: v for k, v in stats.as_dict().items() if k != "overflow"}))
        return stats

    def __enter__(self) -> FramePipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- acquisition side
    def submit(self, frame: np.ndarray, info: FrameInfo) -> None:
        """Hand one raw frame over. Never blocks on the engine or the sinks, never raises on a bad frame."""
        t_submit = time.perf_counter()
        skipped: list[_Pending] = []
        with self._lock:
            index = self._counts.seen
            self._counts.seen += 1
            item = _Pending(index, frame, info, t_submit)
            if not self._accepting:
                self._finish_locked(item, "skipped", "pipeline is not running")
                return
            if self._paused:
                self._finish_locked(item, "paused", "paused")
                return
            if self._channel_policy is not None and (reason := self._channel_policy(info.channel)):
                self._finish_locked(item, "skipped", reason)
                return
            if self._config.overflow == "latest":
                while self._queue:
                    skipped.append(self._queue.popleft())
                self._queue.append(item)
            elif len(self._queue) >= self._config.queue_size:
                skipped.append(item)
            else:
                self._queue.append(item)
            for old in skipped:
                self._finish_locked(old, "skipped", "engine behind: correction queue full")
            self._lock.notify_all()
        if skipped:
            self._log_skips()

    def pause(self) -> None:
        """Stop correcting new frames (they still reach the sinks raw); frames already queued are finished."""
        with self._lock:
            self._paused = True
        log.info(kv("pipeline_paused"))

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        log.info(kv("pipeline_resumed"))

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def engine_name(self) -> str:
        return self._engine_name

    @property
    def sinks(self) -> tuple[FrameSink, ...]:
        return tuple(self._sinks)

    def stats(self) -> PipelineStats:
        with self._lock:
            c = self._counts
            return PipelineStats(
                seen=c.seen,
                refocused=c.refocused,
                skipped=c.skipped,
                failed=c.failed,
                paused_frames=c.paused,
                queue_depth=len(self._queue),
                in_flight=self._in_flight,
                delivered=c.delivered,
                backlog=len(self._results),
                pixels_released=c.pixels_released,
                sink_errors=c.sink_errors + sum(s.errors for s in self._sinks if isinstance(s, BackgroundSink)),
                paused=self._paused,
                engine=self._engine_name,
                overflow=self._config.overflow,
                queue_size=self._config.queue_size,
            )

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every frame submitted so far has been delivered to the sinks (queued, for a BackgroundSink).
        False on timeout.

        The closed focus loop uses this between time points, so a correction is based on the latest estimates.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            target = self._counts.seen
            while self._counts.delivered < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    # ----------------------------------------------------------------- internals
    def _finish_locked(self, item: _Pending, status: FrameStatus, reason: str, **values: Any) -> None:
        """Count a result and queue it for the sinks. Caller holds the lock."""
        c = self._counts
        if status == "refocused":
            c.refocused += 1
        elif status == "skipped":
            c.skipped += 1
        elif status == "failed":
            c.failed += 1
            c.failure_reasons[reason] = c.failure_reasons.get(reason, 0) + 1
        else:
            c.paused += 1
        raw: np.ndarray | None = item.raw
        if status != "refocused" and len(self._results) >= self._config.max_backlog_frames:
            raw = None  # the sinks are behind: keep the record, not the pixels (memory stays bounded)
            c.pixels_released += 1
            self._log_released_locked()
        result = FrameResult(
            frame=item.frame,
            raw=raw,
            info=item.info,
            status=status,
            reason=reason if status != "refocused" else "",
            engine=self._engine_name,
            latency_ms=(time.perf_counter() - item.t_submit) * 1000.0,
            **values,
        )
        self._results.append(result)
        self._lock.notify_all()

    def _log_released_locked(self) -> None:
        now = time.monotonic()
        if now - self._last_release_log >= 5.0:  # at most one line per 5 s; the count is always exact
            self._last_release_log = now
            log.warning(
                kv(
                    "frame_pixels_released",
                    released_total=self._counts.pixels_released,
                    backlog=len(self._results),
                    max_backlog_frames=self._config.max_backlog_frames,
                    note="sinks behind (disk or subscriber); these frames reach them without pixels, "
                    "raw data is saved by the acquisition as always",
                )
            )

    def _log_skips(self) -> None:
        now = time.monotonic()
        if now - self._last_skip_log >= 5.0:  # at most one line per 5 s; the count is always exact
            self._last_skip_log = now
            stats = self.stats()
            log.warning(
                kv(
                    "frames_skipped",
                    skipped_total=stats.skipped,
                    seen=stats.seen,
                    overflow=self._config.overflow,
                    queue_size=self._config.queue_size,
                    note="engine slower than the camera; raw frames are all saved",
                )
            )

    def _work(self) -> None:
        while True:
            with self._lock:
                # wait for a frame, and for room in the sinks' backlog: refocused results always keep their pixels
                backlog_full = len(self._results) >= self._config.max_backlog_frames
                while (not self._queue or backlog_full) and not self._stopping:
                    self._lock.wait()
                    backlog_full = len(self._results) >= self._config.max_backlog_frames
                if self._abandon:
                    while self._queue:
                        self._finish_locked(self._queue.popleft(), "skipped", "pipeline closed before correction")
                if not self._queue:
                    break
                item = self._queue.popleft()
                self._in_flight = 1
            self._correct(item)
        with self._lock:
            self._in_flight = 0
            self._worker_finished = True
            self._lock.notify_all()

    def _correct(self, item: _Pending) -> None:
        problem = frame_problem(item.raw)
        if problem is not None:
            log.warning(kv("frame_not_processed", frame=item.frame, axes=_axes_text(item.info.axes), reason=problem))
            with self._lock:
                self._in_flight = 0
                self._finish_locked(item, "failed", problem)
            return
        channel = item.info.channel
        corrector = self._channel_correctors.get(channel, self._corrector) if channel is not None else self._corrector
        t0 = time.perf_counter()
        try:
            out = corrector(item.raw, pixel_size_um=item.info.pixel_size_um)
            image = np.asarray(out.image, dtype=np.float32)
            defocus_um, confidence = float(out.defocus_um), float(out.confidence)
            magnitude_um = float(getattr(out, "defocus_magnitude_um", math.nan))
            flags = tuple(getattr(out, "flags", ()))
            if image.shape != item.raw.shape:
                raise ValueError(f"engine returned shape {image.shape} for a frame of shape {item.raw.shape}")
        except Exception as exc:  # noqa: BLE001 - the acquisition must go on: log, count, pass the frame on raw
            reason = f"{type(exc).__name__}: {exc}"
            log.error(kv("frame_failed", frame=item.frame, axes=_axes_text(item.info.axes), reason=reason))
            with self._lock:
                self._in_flight = 0
                self._finish_locked(item, "failed", reason)
            return
        engine_ms = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            self._in_flight = 0
            self._finish_locked(
                item,
                "refocused",
                "",
                image=image,
                defocus_um=defocus_um,
                confidence=confidence,
                defocus_magnitude_um=magnitude_um,
                flags=flags,
                engine_ms=engine_ms,
                model_sha256=str(getattr(corrector, "model_sha256", "")),
            )

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                while not self._results and not self._worker_finished:
                    self._lock.wait()
                if not self._results:
                    break
                result = self._results.popleft()
            for sink in self._sinks:
                try:
                    sink.on_frame(result)
                except Exception as exc:  # noqa: BLE001 - one failing sink must not starve the others; counted
                    with self._lock:
                        self._counts.sink_errors += 1
                    log.error(kv("sink_failed", sink=type(sink).__name__, frame=result.frame, error=repr(exc)))
            with self._lock:
                self._counts.delivered += 1
                self._lock.notify_all()
        self._close_sinks()

    def _close_sinks(self) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - every sink gets closed; a failure is counted
                with self._lock:  # counted like a failed write: the run cannot be called complete
                    self._counts.sink_errors += 1
                log.error(kv("sink_close_failed", sink=type(sink).__name__, error=repr(exc)))


class BackgroundSink:
    """A FrameSink that runs another, slow one (disk) in its own writer thread behind a bounded queue.

    Why: the dispatch thread calls the sinks one after the other, so a sink that can take milliseconds per frame
    (the refocused OME-Zarr store, 16 MB of float32 per 2048 x 2048 frame: usually a fraction of a millisecond,
    several at p99 on a busy machine) delays every sink after it and the next frame's publish and focus
    estimate. Behind this wrapper its time leaves the latency path; its CPU use does not.

    * `on_frame` (dispatch thread) queues the result and returns. When `max_pending` results are already waiting
      it waits for room: back-pressure, never a dropped result. The dispatch thread then falls behind, and later
      results wait in the pipeline's result queue (the engine does not wait for the sinks). Waits are counted in
      `waits` and logged at most once per 5 s.
    * The wrapped sink sees every result, in order, all in the writer thread; `close` runs there too.
    * An exception in the wrapped sink's `on_frame` is logged and counted in `errors` (which the pipeline adds to
      its `sink_errors`); the writer goes on with the next result.
    * `close` drains the queue, closes the wrapped sink and joins the writer; an exception from the wrapped
      `close` is raised again here. Idempotent.
    * Memory: at most `max_pending` + 1 results (their raw and refocused frames) are held here. A process killed
      with SIGKILL loses those, and whatever the wrapped sink had not finished writing itself.
    """

    def __init__(self, sink: FrameSink, max_pending: int = 4) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.sink = sink
        self.max_pending = max_pending
        self._name = type(sink).__name__
        self._queue: queue.Queue[FrameResult | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None  # started with the first frame
        self._closed = False
        self._close_error: Exception | None = None
        self._last_wait_log = 0.0
        self.received = 0  # results queued
        self.written = 0  # results the wrapped sink has returned from (with or without an error)
        self.errors = 0
        self.waits = 0  # on_frame calls that found the queue full and waited for room
        self.max_depth = 0  # most results waiting at once

    def on_frame(self, result: FrameResult) -> None:
        if self._closed:
            raise RuntimeError(f"BackgroundSink({self._name}) is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name=f"{self._name}-writer", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self.waits += 1
            now = time.monotonic()
            if now - self._last_wait_log >= 5.0:
                self._last_wait_log = now
                log.warning(
                    kv(
                        "sink_behind",
                        sink=self._name,
                        waits=self.waits,
                        max_pending=self.max_pending,
                        note="the writer is slower than the frames; the other sinks wait for it",
                    )
                )
            self._queue.put(result)
        self.received += 1
        self.max_depth = max(self.max_depth, self._queue.qsize())

    def _write(self) -> None:
        while (result := self._queue.get()) is not None:
            try:
                self.sink.on_frame(result)
            except Exception as exc:  # noqa: BLE001 - the next frames must still be written
                self.errors += 1
                log.error(kv("sink_failed", sink=self._name, frame=result.frame, error=repr(exc)))
            self.written += 1
            del result  # do not hold the last frame's pixels while waiting for the next
        try:
            self.sink.close()
        except Exception as exc:  # noqa: BLE001 - raised again by close(), in the caller's thread
            self._close_error = exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:  # never got a frame: nothing queued
            self.sink.close()
            return
        self._queue.put(None)  # after every queued result
        self._thread.join()
        log.info(
            kv(
                "background_sink_closed",
                sink=self._name,
                written=self.written,
                errors=self.errors,
                waits=self.waits,
                max_depth=self.max_depth,
                max_pending=self.max_pending,
            )
        )
        if self._close_error is not None:
            raise self._close_error


def _axes_text(axes: dict[str, int]) -> str:
    return ",".join(f"{k}{v}" for k, v in axes.items()) or "-"
