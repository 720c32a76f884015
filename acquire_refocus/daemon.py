"""The acquisition-side daemon: one engine, one publisher, one control socket, and a pipeline per run.

A run = one useq MDASequence acquired through the configured backend ("simulator": the simulated microscope in a
pymmcore-plus UniMMCore; "pymmcore-plus": a real Micro-Manager configuration in a CMMCorePlus; "pycromanager": the
Micro-Manager desktop application, or pycromanager's headless backend; `hooks.backend` picks it, and the daemon
only calls its `AcquisitionBackend` methods). Every frame goes through
`FramePipeline` to the sinks, latency-critical ones first: focus controller, publisher, focus log, then the
refocused store in its own writer thread (`BackgroundSink`), so neither the closed focus loop nor viewers wait
for the disk. Acquisitions run in their own thread; the main thread waits for control requests and signals, so
SIGINT/SIGTERM cancel the acquisition, drain the queue, close the stores and exit cleanly.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import useq
import yaml
from pymmcore_plus import CMMCorePlus

from acquire_refocus.channels import WithheldModels, driving_channel, refocus_policy, sequence_channels
from acquire_refocus.config import AppConfig, dump_config
from acquire_refocus.control import ControlServer
from acquire_refocus.diskspace import SpaceNeed, check_space, low_space_problem, space_need
from acquire_refocus.errors import ConfigError, UserError
from acquire_refocus.focus.controller import FocusController, check_hold
from acquire_refocus.hooks.backend import FrameFormat, RunRequest, create_backend
from acquire_refocus.hooks.pymmcore_plus_backend import PymmcorePlusBackend
from acquire_refocus.logs import kv
from acquire_refocus.model.verdict import check_corrector
from acquire_refocus.outputs import output_folder
from acquire_refocus.pipeline import (
    BackgroundSink,
    ChannelPolicy,
    FrameCorrector,
    FramePipeline,
    FrameSink,
    PipelineStats,
)
from acquire_refocus.publishing import Publisher, PublishSink
from acquire_refocus.run_watch import Check, RunWatch
from acquire_refocus.security import SecureContext
from acquire_refocus.sequence import parse_sequence, z_planes
from acquire_refocus.storage import (
    FOCUS_LOG,
    MAX_UNCOMMITTED_FRAMES,
    RAW_STORE,
    REFOCUSED_STORE,
    RUN_RECORD,
    FocusLog,
    RawFrameLog,
    RefocusedStore,
    expected_frames,
    package_versions,
    process_identity,
    read_run_state,
    stored_frame_count,
    utc_now,
    write_run_record,
)

if TYPE_CHECKING:
    from acquire_refocus.sim.devices import ClockedMicroscope

log = logging.getLogger(__name__)

# Refocused results waiting for the store's writer thread before the dispatch thread waits (back-pressure): enough
# to ride out a slow write or two, few enough to bound memory (24 MB per 2048 x 2048 uint16 frame + float32 result)
# and what a kill -9 can lose.
REFOCUSED_WRITE_QUEUE = 4


MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def refuse_previous_run(output_dir: str | Path) -> None:
    """UserError when the folder already holds a run: raw data is never overwritten (nothing is created)."""
    folder = Path(output_dir)
    previous = read_run_state(folder)
    if previous is not None or (folder / RAW_STORE).exists() or (folder / REFOCUSED_STORE).exists():
        state = f" that {_STATE_WORDS.get(previous['state'], previous['state'])}" if previous else ""
        raise UserError(
            f"{folder} already holds a run{state} ({RAW_STORE} / {REFOCUSED_STORE}); raw data is never "
            "overwritten: choose another --output directory"
        )


def _run_output(output_dir: str | Path) -> Path:
    """The folder a run writes into, created; UserError when it already holds a run or cannot be used."""
    refuse_previous_run(output_dir)
    return output_folder(output_dir, "--output")


_STATE_WORDS = {
    "interrupted": "was interrupted (its process ended while it was running: killed, or the machine stopped)",
    "running": "is still running",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "was cancelled",
}


def interrupted_runs(root: Path | None) -> list[str]:
    """Folders directly in `root` (and root itself) whose run was interrupted: a record left at "running" by a
    process that is gone."""
    if root is None or not root.is_dir():
        return []
    found = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        record = read_run_state(folder)
        if record is not None and record.get("state") == "interrupted":
            found.append(str(folder))
    return found


def load_refocuser(config: AppConfig) -> FrameCorrector:
    """The configured model on the configured engine (Refocuser.load logs which engine it picked and why)."""
    from acquire_refocus import Refocuser

    return Refocuser.load(config.model.weights, engine=config.engine)


def load_channel_refocusers(config: AppConfig) -> dict[str, FrameCorrector]:
    """The models of model.weights_per_channel on the configured engine, loaded once before any frame; a weights
    file that is missing or damaged is a ConfigError naming the channel."""
    from acquire_refocus import Refocuser
    from acquire_refocus.errors import WeightsError

    loaded: dict[str, FrameCorrector] = {}
    for channel, path in config.model.weights_per_channel.items():
        try:
            loaded[channel] = Refocuser.load(path, engine=config.engine)
        except WeightsError as exc:
            raise ConfigError(f"model.weights_per_channel.{channel}: {exc}") from None
    return loaded


@dataclass
class RunSummary:
    """What one run produced."""

    run: str
    output_dir: Path | None
    backend: str
    started: str
    ended: str = ""
    wall_s: float = 0.0
    stats: PipelineStats | None = None
    publisher: dict[str, Any] = field(default_factory=dict)
    focus: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    cancelled: bool = False
    raw_frames: dict[str, int] = field(default_factory=dict)  # acquired / on disk, where the daemon can count them

    def counts(self) -> dict[str, Any]:
        return self.stats.as_dict() if self.stats is not None else {}


class Daemon:
    """Holds the engine, the publisher and the control socket across runs; see the module docstring."""

    def __init__(
        self,
        config: AppConfig,
        output_dir: Path | None = None,
        corrector: FrameCorrector | None = None,
        control: bool = True,
        extra_sinks: Callable[[], list[FrameSink]] | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir) if output_dir is not None else config.storage.output_dir
        root = config.storage.data_root or self.output_dir
        self.data_root = Path(root).resolve() if root is not None else None
        self._extra_sinks = extra_sinks
        self._lock = threading.Lock()
        self._runs: queue.Queue[tuple[str, useq.MDASequence, Path | None]] = queue.Queue()
        self._queued_outputs: set[Path] = set()  # output folders of runs queued, not yet started
        self._stop = threading.Event()
        self._paused = False
        self._run_count = 0
        self._pipeline: FramePipeline | None = None
        self._controller: FocusController | None = None
        self._current: RunSummary | None = None
        self._last: RunSummary | None = None
        self.backend = create_backend(config)  # loads nothing yet
        self._run_stop: threading.Event | None = None  # set to stop the run in progress (a backend may poll it)
        self.interrupted_runs = interrupted_runs(self.data_root)
        if self.interrupted_runs:
            log.warning(
                kv(
                    "interrupted_runs_found",
                    folders=",".join(self.interrupted_runs),
                    note="their raw frames are on disk; raw_frames.jsonl holds each frame's metadata",
                )
            )
        self.channel_correctors = load_channel_refocusers(config)  # first: a bad file is refused at once
        self.corrector = corrector if corrector is not None else load_refocuser(config)
        opt_in = "set pipeline.allow_harmful_model: true to use them anyway"
        self.model_check = check_corrector(self.corrector, config.pipeline.allow_harmful_model, opt_in)
        self.channel_model_checks = {
            channel: check_corrector(model, config.pipeline.allow_harmful_model, opt_in)
            for channel, model in self.channel_correctors.items()
        }
        requested = config.engine.backend
        self.engine_fallback = (
            f"engine.backend {requested} was asked for but cannot run here (engine_passed_over in the log says "
            f"why); running on {self.engine_name}"
            if requested not in ("auto", self.engine_name)
            else None
        )
        if self.engine_fallback is not None:
            log.warning(kv("engine_fallback", requested=requested, engine=self.engine_name))
        keys_dir = config.publishing.keys_dir
        self._secure = SecureContext.open(keys_dir) if keys_dir is not None else None
        context = self._secure.context if self._secure is not None else None
        security = self._secure.options if self._secure is not None else None
        self.publisher: Publisher | None = None
        self.control: ControlServer | None = None
        try:
            if config.publishing.enabled:
                self.publisher = Publisher(config.publishing, context, security)
            if control:
                self.control = ControlServer(
                    config.publishing.control_address,
                    {
                        "status": self._on_status,
                        "pause": self._on_pause,
                        "resume": self._on_resume,
                        "run": self._on_run,
                        "stop": self._on_stop,
                    },
                    context,
                    security,
                ).start()
        except BaseException:
            self._close_sockets()
            raise
        log.info(
            kv(
                "daemon_ready",
                engine=self.engine_name,
                backend=config.acquisition.backend,
                output=self.output_dir or "not saved (no --output / storage.output_dir)",
                publish=self.publisher.address if self.publisher else "off",
                control=self.control.address if self.control else "off",
                security="curve" if self._secure is not None else "off (loopback only)",
                focus=config.focus.mode,
            )
        )

    @property
    def engine_name(self) -> str:
        return str(getattr(self.corrector, "engine_name", type(self.corrector).__name__))

    def _corrector_of(self, channel: str | None) -> FrameCorrector:
        """The model that refocuses this channel's frames: its own (model.weights_per_channel), else the default."""
        return self.channel_correctors.get(channel, self.corrector) if channel is not None else self.corrector

    # ----------------------------------------------------------------- control handlers (control thread)
    def _on_status(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            pipeline, current, last, controller = self._pipeline, self._current, self._last, self._controller
        shown = current or last
        return {
            "state": "running" if current is not None else ("stopping" if self._stop.is_set() else "idle"),
            "engine": self.engine_name,
            "engine_fallback": self.engine_fallback,
            "backend": self.config.acquisition.backend,
            "paused": self._paused,
            "run": shown.run if shown else None,
            "output_dir": str(shown.output_dir) if shown and shown.output_dir else (str(self.output_dir or "") or None),
            "counts": pipeline.stats().as_dict() if pipeline is not None else (last.counts() if last else {}),
            "publishing": self._publisher_stats(),
            "focus": controller.state() if controller is not None else {"mode": self.config.focus.mode},
            "runs_queued": self._runs.qsize(),
            "interrupted_runs": self.interrupted_runs,
            "security": "curve" if self.config.publishing.keys_dir is not None else "off",
            "data_root": str(self.data_root) if self.data_root is not None else None,
            "model_verdict": self.model_check.status() if self.model_check is not None else None,
        }

    def _on_pause(self, request: dict[str, Any]) -> dict[str, Any]:
        self._paused = True
        with self._lock:
            if self._pipeline is not None:
                self._pipeline.pause()
        return {"paused": True}

    def _on_resume(self, request: dict[str, Any]) -> dict[str, Any]:
        self._paused = False
        with self._lock:
            if self._pipeline is not None:
                self._pipeline.resume()
        return {"paused": False}

    def _on_run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Everything a run would trip over is checked here, so it is refused in the reply rather than later, in
        the daemon's log only: the sequence (its size by arithmetic, in milliseconds however long), the output
        folder (inside the data root), the channels and the pixel size against the loaded hardware, the free
        space of the data root."""
        if self._stop.is_set():
            raise UserError("the daemon is stopping; it takes no new runs")
        if not isinstance(request.get("sequence"), dict):
            raise UserError('run request: "sequence" must be a useq-schema MDASequence object')
        sequence = parse_sequence(request["sequence"], "run request")
        check_hold(self.config.focus, z_planes(sequence))
        output = self._requested_output(request.get("output"))
        frames = self._check_against_hardware(sequence)
        if self.data_root is not None and self.data_root.is_dir() and frames is not None:
            self._check_space(sequence, frames, self.data_root)  # checked again when the run starts
        if output is not None:  # refused now, in the reply, rather than later in the daemon's log
            with self._lock:
                if output in self._queued_outputs:
                    raise UserError(f"{output}: a run queued before this one writes there; choose another --output")
            _run_output(output)
            with self._lock:
                self._queued_outputs.add(output)
        run_id, out_dir = self._next_run(output)
        self._runs.put((run_id, sequence, out_dir))
        return {"run": run_id, "output_dir": str(out_dir) if out_dir else None, "queued_before": self._runs.qsize() - 1}

    def _requested_output(self, value: Any) -> Path | None:
        """The folder a run request names, resolved (`..` and symlinks) and checked to lie inside the data root;
        a relative path is taken relative to the root. None when the request names none."""
        if value is None:
            return None
        if not isinstance(value, str) or not value or "\0" in value or len(value) > MAX_PATH_CHARS:
            raise UserError(
                f'run request: "output" must be a folder path (text of 1 to {MAX_PATH_CHARS} characters, '
                f"no NUL), got {type(value).__name__}"
            )
        if self.data_root is None:
            raise UserError(
                "this daemon saves nothing (started without --output or storage.output_dir), so a run "
                "cannot choose an output folder"
            )
        output = (self.data_root / value).resolve()
        if not output.is_relative_to(self.data_root):
            raise UserError(
                f"{value}: outside the daemon's data root {self.data_root}; runs are saved only inside "
                "it (storage.data_root, default the --output folder)"
            )
        return output

    def _check_against_hardware(self, sequence: useq.MDASequence) -> FrameFormat | None:
        """Channels and pixel size against the loaded hardware, before any store opens (UserError / InputError);
        the frames' format, None where the backend knows it only once frames arrive (then nothing is checked)."""
        frames = self.backend.check(sequence)
        if frames is not None:
            self._check_pixel_size(self.config.acquisition.pixel_size_um or frames.pixel_size_um)
        return frames

    def _check_pixel_size(self, pixel_size_um: float | None) -> None:
        """Every model's check of the frames' pixel size (InputError for one they cannot be resampled from)."""
        for corrector in (self.corrector, *self.channel_correctors.values()):
            check = getattr(corrector, "check_pixel_size_um", None)
            if check is not None:
                check(pixel_size_um)

    def _on_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        self.request_stop("control")
        return {"stopping": True}

    def _publisher_stats(self) -> dict[str, Any]:
        if self.publisher is None:
            return {"enabled": False}
        stats = self.publisher.stats()
        return {
            "enabled": True,
            "address": stats.address,
            "published": stats.published,
            "dropped": stats.dropped,
            "bytes": stats.bytes_published,
        }

    # ----------------------------------------------------------------- runs
    def _next_run(self, output: Path | None) -> tuple[str, Path | None]:
        with self._lock:
            self._run_count += 1
            run_id = f"run-{self._run_count:03d}"
        if output is None and self.output_dir is not None:
            output = self.output_dir / run_id
        return run_id, output

    def request_stop(self, why: str) -> None:
        """Cancel the acquisition in progress (raw data is closed properly), then drain and stop. Thread-safe."""
        if not self._stop.is_set():
            log.info(kv("daemon_stopping", reason=why))
        self._stop.set()
        with self._lock:
            run_stop = self._run_stop
        if run_stop is not None:
            run_stop.set()
        self.backend.cancel()

    def run(self, sequence: useq.MDASequence, output_dir: Path | None, run_id: str | None = None) -> RunSummary:
        """Acquire one sequence (in this thread) with a fresh pipeline; returns when the stores are closed."""
        if run_id is None:
            run_id, _ = self._next_run(None)
        check_hold(self.config.focus, z_planes(sequence))
        if output_dir is not None:
            output_dir = _run_output(output_dir)
        backend = self.config.acquisition.backend
        summary = RunSummary(run=run_id, output_dir=output_dir, backend=backend, started=utc_now())
        controller = (
            FocusController(
                self.config.focus,
                self.config.optics,
                z_planes=z_planes(sequence),
                channel=driving_channel(self.config.focus, sequence_channels(sequence)),
            )
            if self.config.focus.mode != "off"
            else None
        )
        # Dispatch order = latency order, cheapest first among the latency-critical sinks: the focus controller
        # (microseconds, its sharpness measure runs in its own thread; the closed loop waits for its estimates
        # between time points), the publisher (a non-blocking send, ~0.3 ms at 2048 px but milliseconds at p99 on
        # a loaded machine), the focus log (one flushed CSV row), then the refocused store, which writes in its own
        # thread: nothing before it, and no later frame, waits for the disk unless the store's queue is full.
        sinks: list[FrameSink] = [controller] if controller is not None else []
        focus_offset = controller.applied_offset_um if controller is not None else None
        if self.publisher is not None:
            self.publisher.run = run_id
            sinks.append(PublishSink(self.publisher, focus_offset))
        # mistakes the whole run would repeat frame by frame: refused before any store opens
        frames = self._check_against_hardware(sequence)
        space = self._check_space(sequence, frames, output_dir)
        if output_dir is not None:
            store = None
            if self.config.storage.save_refocused:
                pixel_size_um = self.config.acquisition.pixel_size_um or (frames.pixel_size_um if frames else None)
                frame_shape = (frames.height_px, frames.width_px) if frames is not None else None
                store = RefocusedStore(output_dir / REFOCUSED_STORE, sequence, frame_shape, pixel_size_um or None)
            sinks.append(FocusLog(output_dir / FOCUS_LOG, focus_offset))
            if store is not None:
                sinks.append(BackgroundSink(store, max_pending=REFOCUSED_WRITE_QUEUE))
        if self._extra_sinks is not None:
            sinks.extend(self._extra_sinks())
        refusal = self.model_check.refusal if self.model_check is not None else None
        channel_policy: ChannelPolicy = WithheldModels(
            refocus_policy(self.config.pipeline, self.config.optics, self.corrector, self.channel_correctors),
            refusal,
            {
                channel: check.refusal if check is not None else None
                for channel, check in self.channel_model_checks.items()
            },
        )
        pipeline = FramePipeline(self.corrector, sinks, self.config.pipeline, channel_policy, self.channel_correctors)
        if self._paused:
            pipeline.pause()
        with self._lock:
            self._pipeline, self._controller, self._current = pipeline, controller, summary
        log.info(
            kv(
                "run_start",
                run=run_id,
                backend=backend,
                engine=self.engine_name,
                output=output_dir or "not saved",
                focus=self.config.focus.mode,
                refocused_frames=f"withheld: {refusal}" if refusal else "used",
            )
        )
        t0 = time.perf_counter()
        run_stop = threading.Event()
        save_raw = output_dir is not None and self.config.storage.save_raw
        raw_log = self.backend.raw_frame_log(output_dir) if save_raw and output_dir is not None else None
        watch = RunWatch(
            self._run_checks(pipeline, raw_log, output_dir, space),
            lambda reason: self._abort_run(summary, run_stop, reason),
        )
        with self._lock:
            self._run_stop = run_stop
        pipeline.start()
        try:
            self._write_record(summary, sequence, "running")
            watch.start()
            if not self._stop.is_set():
                channel = controller.channel if controller is not None else None
                self.backend.run(
                    RunRequest(
                        sequence=sequence,
                        pipeline=pipeline,
                        controller=controller,
                        corrector=self._corrector_of(channel),
                        output_dir=output_dir,
                        save_raw=save_raw,
                        stop=run_stop,
                        raw_log=raw_log,
                    )
                )
        except UserError as exc:
            summary.error = summary.error or str(exc)
            raise
        except Exception as exc:
            summary.error = summary.error or f"{type(exc).__name__}: {exc}"
            raise
        finally:
            watch.stop()
            if raw_log is not None:
                raw_log.close()
            summary.cancelled = self._stop.is_set()
            summary.stats = pipeline.close(drain=True)
            watch.check_now()  # a store that failed while closing
            raw_missing, incomplete = self._missing_frames(summary, sequence, output_dir, raw_log)
            summary.error = "; ".join(filter(None, [summary.error or incomplete, raw_missing]))
            summary.wall_s = time.perf_counter() - t0
            summary.ended = utc_now()
            summary.publisher = self._publisher_stats()
            summary.focus = controller.state() if controller is not None else {"mode": "off"}
            with self._lock:
                self._pipeline, self._controller, self._current, self._last = None, None, None, summary
                self._run_stop = None
            self._write_record(
                summary, sequence, "failed" if summary.error else ("cancelled" if summary.cancelled else "completed")
            )
            log.info(
                kv(
                    "run_done",
                    run=run_id,
                    wall_s=f"{summary.wall_s:.1f}",
                    error=summary.error or "none",
                    **{
                        k: v
                        for k, v in summary.counts().items()
                        if k in ("seen", "refocused", "skipped", "failed", "pixels_released")
                    },
                )
            )
        return summary

    def _check_space(
        self, sequence: useq.MDASequence, frames: FrameFormat | None, output_dir: Path | None
    ) -> SpaceNeed | None:
        """Refuse (UserError) a run whose frames cannot fit on the output disk; the SpaceNeed to watch during the
        run. None when nothing is saved, or the frame size is not known before the first frame (pycromanager)."""
        storage = self.config.storage
        if output_dir is None or not (storage.save_raw or storage.save_refocused):
            return None
        if frames is None:
            log.warning(
                kv(
                    "disk_space_not_checked",
                    output=output_dir,
                    reason="the frame size is known only once the desktop application sends frames",
                )
            )
            return None
        raw_bytes = frames.bytes_per_pixel if storage.save_raw else None
        margin_frames = (
            self.config.pipeline.queue_size
            + self.config.pipeline.max_backlog_frames
            + REFOCUSED_WRITE_QUEUE
            + MAX_UNCOMMITTED_FRAMES
        )
        need = space_need(
            expected_frames(sequence),
            frames.height_px,
            frames.width_px,
            raw_bytes,
            storage.save_refocused,
            margin_frames,
            storage.min_free_mb,
        )
        check_space(output_dir, need)
        return need

    def _run_checks(
        self, pipeline: FramePipeline, raw_log: RawFrameLog | None, output_dir: Path | None, space: SpaceNeed | None
    ) -> list[Check]:
        """What stops a run while it goes on: low disk space, and a failed write of any store."""
        checks: list[Check] = []
        if output_dir is not None and space is not None:
            checks.append(lambda: low_space_problem(output_dir, space))

        def sink_failed() -> str:
            errors = pipeline.stats().sink_errors
            if not errors:
                return ""
            return f"{errors} write(s) of the focus log or refocused store failed (sink_failed in the log)"

        checks.append(sink_failed)
        if raw_log is not None:
            checks.append(lambda: f"the raw frame log could not be written: {raw_log.error}" if raw_log.error else "")
        return checks

    def _abort_run(self, summary: RunSummary, run_stop: threading.Event, reason: str) -> None:
        """Stop this run (not the daemon) as failed: the backend finishes the frame in progress and closes the raw
        store; the queue drains into the other stores."""
        summary.error = summary.error or reason
        run_stop.set()
        self.backend.cancel()

    def _missing_frames(
        self, summary: RunSummary, sequence: useq.MDASequence, output_dir: Path | None, raw_log: RawFrameLog | None
    ) -> tuple[str, str]:
        """Why a run is not complete although it may have raised nothing: (raw frames acquired that are not on
        disk, fewer frames than the sequence asked for unless stopped on request); "" for each that is fine."""
        raw_missing = incomplete = ""
        if raw_log is not None and output_dir is not None:  # counted whatever else went wrong, for run.json
            summary.raw_frames = {"acquired": raw_log.rows, "on_disk": stored_frame_count(output_dir / RAW_STORE)}
            acquired, on_disk = raw_log.rows, summary.raw_frames["on_disk"]
            if on_disk < acquired:
                raw_missing = (
                    f"{acquired - on_disk} of {acquired} raw frames are not in {RAW_STORE} (the raw "
                    "writer failed; its error is in the log)"
                )
        seen = summary.stats.seen if summary.stats is not None else 0
        expected = expected_frames(sequence)
        if not summary.cancelled and seen < expected:
            incomplete = (
                f"the camera delivered {seen} of the {expected} frames the sequence asked for "
                "(see the acquisition's warnings in the log)"
            )
        return raw_missing, incomplete

    def acquisition_core(self) -> CMMCorePlus:
        """The Micro-Manager core of the simulator or pymmcore-plus backend, loaded once per daemon (by whichever
        thread asks first: serve, a run, or the control thread checking a request). ConfigError for a backend
        without a core in this process (pycromanager)."""
        if not isinstance(self.backend, PymmcorePlusBackend):
            raise ConfigError(
                f"acquisition.backend {self.config.acquisition.backend}: there is no Micro-Manager core in this process"
            )
        return self.backend.core()

    @property
    def scope(self) -> ClockedMicroscope | None:
        """The simulated microscope (simulator backend, once its core is loaded); None otherwise."""
        return self.backend.scope if isinstance(self.backend, PymmcorePlusBackend) else None

    def _write_record(self, summary: RunSummary, sequence: useq.MDASequence, state: str) -> None:
        if summary.output_dir is None:
            return
        record = {
            "run": summary.run,
            "state": state,
            "started": summary.started,
            "ended": summary.ended or None,
            "wall_s": round(summary.wall_s, 3),
            "backend": summary.backend,
            "engine": self.engine_name,
            "engine_fallback": self.engine_fallback,
            "model_sha256": getattr(self.corrector, "model_sha256", None),
            "channel_models": {
                channel: getattr(model, "model_sha256", None) for channel, model in self.channel_correctors.items()
            }
            or None,
            "stores": {"raw": RAW_STORE, "refocused": REFOCUSED_STORE, "focus_log": FOCUS_LOG},
            "counts": summary.counts(),
            "raw_frames": summary.raw_frames or None,
            "publishing": summary.publisher,
            "focus": summary.focus,
            "error": summary.error or None,
            "sequence": sequence.model_dump(mode="json", exclude_unset=True),
            "config": yaml.safe_load(dump_config(self.config)),
            "versions": package_versions(),
            **process_identity(),
        }
        try:
            write_run_record(summary.output_dir / RUN_RECORD, record)
        except OSError as exc:  # a full disk: the previous record stays (a "running" one reads "interrupted")
            log.error(
                kv(
                    "run_record_not_written",
                    path=summary.output_dir / RUN_RECORD,
                    state=state,
                    error=exc.strerror or str(exc),
                    run_error=summary.error or "none",
                )
            )
            summary.error = summary.error or f"{RUN_RECORD} could not be written: {exc.strerror or exc}"

    # ----------------------------------------------------------------- serving
    def serve(self, once: bool = False, handle_signals: bool = True) -> int:
        """--once: run the config's sequence into the output directory and return. Otherwise: run each sequence
        sent with the `run` command until `stop` or a signal. Returns the exit code (0 unless a run failed)."""
        if handle_signals:
            self._install_signal_handlers()
        exit_code = 0
        if once:
            if self.config.acquisition.sequence is None:
                raise ConfigError("acquisition.sequence: required with --once (inline, or a YAML/JSON file path)")
            sequence = parse_sequence(self.config.acquisition.sequence)
            run_id, _ = self._next_run(None)
            self._runs.put((run_id, sequence, self.output_dir))
        else:
            self.backend.prepare()  # the hardware is loaded before the first request, which is checked against it
            log.info(
                kv(
                    "daemon_waiting",
                    control=self.control.address if self.control else "off",
                    hint="send a sequence with 'acquire-refocus run FILE'",
                )
            )
        while not self._stop.is_set():
            try:
                run_id, sequence, out_dir = self._runs.get(timeout=0.2)
            except queue.Empty:
                continue
            if out_dir is not None:
                with self._lock:
                    self._queued_outputs.discard(out_dir.resolve())
            summary = self._run_in_thread(run_id, sequence, out_dir, raise_user_errors=once)
            if summary is None or summary.error:
                exit_code = 1
            if once:
                break
        return exit_code

    def _run_in_thread(
        self, run_id: str, sequence: useq.MDASequence, out_dir: Path | None, raise_user_errors: bool = False
    ) -> RunSummary | None:
        """Acquire in a worker thread so this (main) thread stays free for signals. A run that fails is logged and
        the daemon waits for the next; with `raise_user_errors` (--once) a user mistake is raised instead, for the
        command to report as its error."""
        outcome: list[RunSummary | BaseException] = []  # the run's summary, or what it raised

        def target() -> None:
            try:
                outcome.append(self.run(sequence, out_dir, run_id))
            except BaseException as exc:  # noqa: BLE001 - whatever ends the run is reported below, in the main thread
                outcome.append(exc)

        thread = threading.Thread(target=target, name="acquisition", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
        result = outcome[0]
        if isinstance(result, UserError):
            if raise_user_errors:
                raise result
            log.error(kv("run_failed", run=run_id, error=str(result)))
            return None
        if isinstance(result, BaseException):
            log.error(kv("run_failed", run=run_id, error=f"{type(result).__name__}: {result}"), exc_info=result)
            return None
        return result

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            # Only set a flag and cancel: the MDA runner's cancel takes a lock in another thread, never this one.
            threading.Thread(target=self.request_stop, args=(signal.Signals(signum).name,), daemon=True).start()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _close_sockets(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.publisher is not None:
            self.publisher.close()
        if self._secure is not None:
            self._secure.close()
            self._secure = None

    def close(self) -> None:
        self._close_sockets()
        try:
            self.backend.close()
        except Exception as exc:  # noqa: BLE001 - a device that fails to unload must not stop the daemon's exit; logged
            log.warning(kv("unload_devices_failed", error=repr(exc)))
        log.info(kv("daemon_closed"))

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
