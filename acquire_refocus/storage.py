"""Saving beside the raw data: refocused frames (OME-Zarr), the focus log (CSV) and the run record (JSON).

Layout of an output directory:

    DIR/raw.ome.zarr        raw frames, written by the acquisition backend's own writer (never rewritten here)
    DIR/refocused.ome.zarr  refocused frames, float32, same axes and frame order as the raw data
    DIR/focus.csv           one row per raw frame: estimate, stage Z, whether it was refocused, latency
    DIR/run.json            config, model, engine, package versions, times, counts
    DIR/raw_frames.jsonl    the raw store's per-frame metadata (stage position, times, camera), one line per
                            frame as it is written: ome-writers only writes it into the store at close

Both OME-Zarr stores are written with `ome-writers` (the writer pymmcore-plus itself uses), one chunk per frame
and no sharding, with the OME-NGFF metadata on disk from creation: after a crash or `kill -9`, everything but the
frames in flight stays readable (in the daemon, the refocused store writes in its own thread behind a queue of
4 results, `pipeline.BackgroundSink`, and has at most `MAX_UNCOMMITTED_FRAMES` being written: those are in flight
too). The focus log is flushed after every row.
run.json is written at the start and replaced atomically at the end.

ome-writers' tensorstore backend (the one pymmcore-plus installs) writes asynchronously and keeps every write's
future until the store closes, with no public bound: with a disk slower than the camera, frames waiting to be
written would pile up in memory. `RefocusedStore` therefore waits for the oldest write once
`MAX_UNCOMMITTED_FRAMES` are in flight (and lets go of finished ones, raising a failed write's error there). The
wait backs up into `BackgroundSink`'s queue and then the pipeline's `max_backlog_frames`, which bounds memory.
It reaches into the backend's private `_futures` list; without one (another backend or version) writes are
synchronous or unbounded as that backend makes them, and `pending_writes` is None.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import useq

from acquire_refocus.logs import kv
from acquire_refocus.pipeline import FocusOffsetLookup, FrameResult
from acquire_refocus.sequence import axes_dict, axis_sizes, event_axes, nested_event_count

if TYPE_CHECKING:
    import zarr
    from zarr.types import AnyArray

log = logging.getLogger(__name__)

MAX_UNCOMMITTED_FRAMES = 8  # refocused frames written but not yet on disk (16 MB each at 2048 x 2048 float32)

RAW_STORE = "raw.ome.zarr"
REFOCUSED_STORE = "refocused.ome.zarr"
FOCUS_LOG = "focus.csv"
RUN_RECORD = "run.json"
RAW_FRAME_LOG = "raw_frames.jsonl"
FOCUS_LOG_COLUMNS = (
    "frame",
    "axes",
    "stage_z_um",
    "defocus_um",
    "confidence",
    "refocused",
    "latency_ms",
    "status",
    "t_acquired",
    "defocus_magnitude_um",
    "focus_offset_um",
    "flags",
    "model_sha256",  # first 12 hex digits of the weights that refocused the frame (run.json has them in full)
)
PACKAGES = (
    "acquire-refocus",
    "numpy",
    "torch",
    "onnxruntime",
    "pymmcore",
    "pymmcore-plus",
    "useq-schema",
    "ome-writers",
    "zarr",
    "tensorstore",
    "pyzmq",
    "pycromanager",
)


def _axes_key(axes: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(axes_dict(axes).items()))


def stream_settings(
    path: Path,
    sequence: useq.MDASequence | None,
    height_px: int,
    width_px: int,
    dtype: str,
    pixel_size_um: float | None,
) -> Any:
    """ome-writers settings for frames laid out like `sequence` (as pymmcore-plus lays out the raw data):
    one chunk per frame, no sharding; an unbounded time axis when there is no sequence."""
    from ome_writers import AcquisitionSettings, Dimension, useq_to_acquisition_settings

    layout: Mapping[str, Any] | None = None
    if sequence is not None:
        try:
            layout = useq_to_acquisition_settings(
                sequence, image_width=width_px, image_height=height_px, pixel_size_um=pixel_size_um
            )
        except NotImplementedError as exc:  # as pymmcore-plus does for its raw store: frames in acquisition order
            log.warning(kv("store_layout_fallback", path=path, reason=str(exc), layout="t,y,x"))
    if layout is None:
        layout = {
            "dimensions": [
                Dimension(name="t", count=None, chunk_size=1, type="time"),
                Dimension(name="y", count=height_px, chunk_size=height_px, scale=pixel_size_um, unit="micrometer"),
                Dimension(name="x", count=width_px, chunk_size=width_px, scale=pixel_size_um, unit="micrometer"),
            ],
            "plate": None,
        }
    layout = dict(layout)
    if np.dtype(dtype).kind == "f":
        # ome-writers 0.3.2 builds OMERO display windows for named channels with np.iinfo, which fails for
        # float data: keep the channel axis, leave its names to the raw store.
        layout["dimensions"] = [
            d.model_copy(update={"coords": None}) if d.type == "channel" else d for d in layout["dimensions"]
        ]
    return AcquisitionSettings(root_path=str(path), overwrite=False, dtype=dtype, **layout)


def raw_store_settings(
    path: Path, sequence: useq.MDASequence, height_px: int, width_px: int, dtype: str, pixel_size_um: float | None
) -> Any:
    """Settings for the raw store written by pymmcore-plus (`mda.run(seq, output=settings)`)."""
    return stream_settings(path, sequence, height_px, width_px, dtype, pixel_size_um)


@dataclass(frozen=True)
class _Placement:
    axes: dict[str, int]
    image: np.ndarray | None  # the refocused frame, or None: leave the plane empty
    shape: tuple[int, ...] | None  # the raw frame's (height, width); None when it has no usable shape
    frame: int


def expected_frames(sequence: useq.MDASequence) -> int:
    """Frames the sequence acquires: the full nest by arithmetic for a regular sequence, else its events counted
    (a channel every n-th time point, positions with their own sub-sequence)."""
    if _AcquisitionSlots.for_sequence(sequence) is not None:
        return nested_event_count(sequence)
    # an autofocus_plan's events take no frame of the acquisition
    return sum(1 for event in sequence if not isinstance(event.action, useq.HardwareAutofocus))


# Events of the sequence checked against the arithmetic of `_AcquisitionSlots` before it is trusted.
_SLOTS_CHECKED_EVENTS = 1000


class _AcquisitionSlots:
    """Where the event with given useq indices lies in the acquisition order of a regular sequence (every
    combination of its axes acquired once, nested in `axis_order`), by arithmetic: listing the events of a long
    time-lapse first would take minutes (useq yields one in ~0.1 ms) and hold the acquisition back."""

    def __init__(self, sequence: useq.MDASequence) -> None:
        sizes = {axis: n for axis, n in axis_sizes(sequence).items() if n}
        self.axes = [axis for axis in sequence.axis_order if axis in sizes]
        self.sizes = [sizes[axis] for axis in self.axes]
        self.strides = [math.prod(self.sizes[i + 1 :]) for i in range(len(self.axes))]
        self.count = nested_event_count(sequence)

    @classmethod
    def for_sequence(cls, sequence: useq.MDASequence) -> _AcquisitionSlots | None:
        """None for a sequence whose events are not the full nest of its axes (channels acquired every n-th time
        point or without their z-stack, positions with their own sub-sequence) or do not come in that order."""
        irregular = any(c.acquire_every > 1 or not c.do_stack for c in sequence.channels) or any(
            p.sequence is not None for p in sequence.stage_positions
        )
        if irregular:
            return None
        slots = cls(sequence)
        for expected, event in enumerate(itertools.islice(sequence, _SLOTS_CHECKED_EVENTS)):
            if slots.slot(_axes_key(event.index)) != expected:
                return None
        return slots

    def slot(self, key: tuple[tuple[str, int], ...]) -> int | None:
        index = dict(key)
        if set(index) != set(self.axes):
            return None
        position = 0
        for axis, size, stride in zip(self.axes, self.sizes, self.strides, strict=True):
            if not 0 <= index[axis] < size:
                return None
            position += index[axis] * stride
        return position


def _frame_count(settings: Any) -> int | None:
    """Frames a bounded layout holds (None when a dimension is unbounded)."""
    count = 1
    for dim in settings.dimensions[:-2]:
        if dim.count is None:
            return None
        count *= dim.count
    return count


class RefocusedStore:
    """FrameSink writing refocused frames to an OME-Zarr store with the raw data's axes and frame order.

    Results reach the sinks in the order they were resolved, not acquired (a skipped frame resolves at once, a
    queued one later), so a small reorder buffer puts them back into acquisition order; its size is bounded by
    the pipeline's queue. A frame that was not refocused leaves its plane at the fill value 0 (focus.csv says
    which). With a sequence, frames are placed by their useq index, so events the acquisition skipped stay empty
    in both stores.
    """

    def __init__(
        self,
        path: str | Path,
        sequence: useq.MDASequence | None = None,
        frame_shape: tuple[int, int] | None = None,
        pixel_size_um: float | None = None,
    ) -> None:
        self.path = Path(path)
        self._sequence = sequence
        self._pixel_size_um = pixel_size_um
        self._order = _AcquisitionSlots.for_sequence(sequence) if sequence is not None else None
        self._stream: Any = None
        self._next_frame = 0  # next pipeline frame index to place
        self._next_slot = 0  # next position in the store's acquisition order
        self._pending: dict[int, _Placement] = {}
        self.frames_written = 0
        self.frames_empty = 0
        if frame_shape is not None:
            self._open(frame_shape)

    def _open(self, frame_shape: tuple[int, int]) -> None:
        from ome_writers import create_stream

        settings = stream_settings(
            self.path, self._sequence, frame_shape[0], frame_shape[1], "float32", self._pixel_size_um
        )
        if self._order is not None and self._order.count != _frame_count(settings):
            self._order = None  # a fallback layout: place frames in acquisition order
        self._stream = create_stream(settings)
        log.info(kv("refocused_store_created", path=self.path, frame_px=f"{frame_shape[1]}x{frame_shape[0]}"))

    def on_frame(self, result: FrameResult) -> None:
        raw = result.raw
        shape = tuple(raw.shape) if isinstance(raw, np.ndarray) and raw.ndim == 2 else None
        image = result.image if result.image is not None and shape is not None and result.image.shape == shape else None
        # keep only what placing needs: waiting frames must not hold raw pixels in memory
        self._pending[result.frame] = _Placement(dict(result.info.axes), image, shape, result.frame)
        while self._next_frame in self._pending:
            self._place(self._pending.pop(self._next_frame))
            self._next_frame += 1

    def _place(self, item: _Placement) -> None:
        if self._stream is None:
            if item.shape is None:
                return  # nothing with this shape can be stored; the focus log has the frame
            self._open((int(item.shape[0]), int(item.shape[1])))
        slot = self._next_slot
        if self._order is not None:
            found = self._order.slot(_axes_key(item.axes))
            slot = -1 if found is None else found
            if slot < self._next_slot:
                log.warning(
                    kv(
                        "refocused_frame_not_placed",
                        frame=item.frame,
                        axes=item.axes,
                        reason="index not in the sequence, or out of order",
                    )
                )
                return
            if slot > self._next_slot:
                self._stream.skip(frames=slot - self._next_slot)
                self.frames_empty += slot - self._next_slot
        if item.image is not None:
            self._stream.append(np.ascontiguousarray(item.image, dtype=np.float32))
            self.frames_written += 1
            self._bound_pending_writes()
        else:
            self._stream.skip(frames=1)
            self.frames_empty += 1
        self._next_slot = slot + 1

    def _write_futures(self) -> list[Any] | None:
        futures = getattr(getattr(self._stream, "_backend", None), "_futures", None)
        return futures if isinstance(futures, list) else None

    @property
    def pending_writes(self) -> int | None:
        """Frames handed to the backend and not yet on disk (None: the backend does not say)."""
        futures = self._write_futures()
        return None if futures is None else sum(not f.done() for f in futures)

    def _bound_pending_writes(self) -> None:
        futures = self._write_futures()
        if futures is None:
            return
        for future in [f for f in futures if f.done()]:
            futures.remove(future)
            future.result()  # a failed write raises here, in the writer thread, not only at close
        while len(futures) > MAX_UNCOMMITTED_FRAMES:
            futures.pop(0).result()  # the disk is behind: wait for the oldest write

    def close(self) -> None:
        for frame in sorted(self._pending):  # frames that never resolved cannot exist after a drain; be safe
            self._place(self._pending.pop(frame))
        if self._stream is not None:
            self._stream.close()
            log.info(kv("refocused_store_closed", path=self.path, written=self.frames_written, empty=self.frames_empty))


def _number(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.{digits}f}"


class FocusLog:
    """FrameSink writing focus.csv: one row per raw frame, flushed at once so a crash loses no row."""

    def __init__(self, path: str | Path, focus_offset: FocusOffsetLookup | None = None) -> None:
        """`focus_offset`: where the focus loop's offset for each frame comes from (empty column without one)."""
        self.path = Path(path)
        self._focus_offset = focus_offset
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(FOCUS_LOG_COLUMNS)
            self._file.flush()
        self.rows = 0

    def on_frame(self, result: FrameResult) -> None:
        info = result.info
        self._writer.writerow(
            (
                result.frame,
                json.dumps(dict(info.axes), separators=(",", ":")),
                _number(info.stage_z_um, 4),
                _number(result.defocus_um, 4),
                _number(result.confidence, 4),
                "true" if result.refocused else "false",
                f"{result.latency_ms:.2f}",
                result.status,
                f"{info.t_acquired:.6f}",
                _number(result.defocus_magnitude_um, 4),
                _number(self._focus_offset(info.axes) if self._focus_offset is not None else None, 4),
                ";".join(result.flags),
                result.model_sha256[:12],
            )
        )
        self._file.flush()
        self.rows += 1

    def close(self) -> None:
        self._file.close()


def read_focus_log(path: str | Path) -> list[dict[str, Any]]:
    """focus.csv as dicts with numbers parsed (empty -> nan) and refocused as bool."""
    rows = []
    with Path(path).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = dict(row)
            parsed["frame"] = int(row["frame"])
            parsed["axes"] = json.loads(row["axes"])
            for key in (
                "stage_z_um",
                "defocus_um",
                "confidence",
                "latency_ms",
                "t_acquired",
                "defocus_magnitude_um",
                "focus_offset_um",
            ):
                parsed[key] = float(row[key]) if row.get(key) else math.nan
            parsed["refocused"] = row["refocused"] == "true"
            rows.append(parsed)
    return rows


class RawFrameLog:
    """pymmcore-plus frameReady handler writing raw_frames.jsonl: the per-frame metadata pymmcore-plus hands the raw
    store's writer (which keeps it in memory until the store closes, so a kill -9 loses all of it), one flushed line
    per frame, in the acquisition thread right after the frame went to the writer. A write error (disk full) is
    kept in `error` for the daemon to stop the run on, never raised into the acquisition."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")
        self.rows = 0
        self.error = ""

    def frameReady(  # noqa: N802 - named after the pymmcore-plus signal it listens to
        self, image: np.ndarray, event: useq.MDAEvent, meta: Mapping[str, Any]
    ) -> None:
        if self.error:
            return
        row = {"frame": self.rows, "axes": event_axes(event), "t_written": round(time.time(), 6), "meta": meta}
        try:
            self._file.write(json.dumps(row, separators=(",", ":"), default=str, allow_nan=False) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            self.error = f"{self.path.name}: {exc}"
            return
        self.rows += 1

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:  # the last buffered line could not be written
            self.error = self.error or f"{self.path.name}: {exc}"


def read_raw_frame_log(path: str | Path) -> list[dict[str, Any]]:
    """raw_frames.jsonl as dicts; a last line cut short by a crash is left out."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def stored_frame_count(store: str | Path) -> int:
    """Frames on disk in an OME-Zarr store written one chunk per frame (every series): chunks that exist. A
    frame whose pixels all equal the fill value (0) is not stored as a chunk, so it counts as missing."""
    root = Path(store)
    if not root.exists():
        return 0
    return sum(int(series.nchunks_initialized) for series in open_stores(root.parent)[_STORE_NAMES[root.name]].values())


def read_run_state(folder: str | Path) -> dict[str, Any] | None:
    """The run record of `folder` (None without one) with its state as it stands now: a record still saying
    "running" whose process is gone (killed, or the machine went down) reads "interrupted"."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"state": "unreadable", "error": f"{path}: {exc}"}
    if not isinstance(record, dict):
        return {"state": "unreadable", "error": f"{path}: not a run record"}
    if record.get("state") == "running" and not _process_alive(record):
        record["state"] = "interrupted"
    return record


def process_identity() -> dict[str, Any]:
    """What run.json records to tell later whether its writer still runs: host, pid and the pid's start time."""
    return {"host": platform.node(), "pid": os.getpid(), "pid_started": _start_ticks(os.getpid())}


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux /proc; None elsewhere): a pid reused by another
    process has another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(record: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a record may still run; on another machine that cannot be known (True)."""
    pid = record.get("pid")
    if record.get("host") != platform.node():
        return True
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = record.get("pid_started")
    return started is None or _start_ticks(pid) in (None, started)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_run_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Write run.json atomically (a crash leaves the previous complete version)."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_STORE_NAMES = {RAW_STORE: "raw", REFOCUSED_STORE: "refocused"}


def _full_resolution_array(image: zarr.Group) -> AnyArray | zarr.Group | None:
    """The first dataset of an image group's OME-NGFF multiscales (0.5 nests them under "ome", 0.4 does not)."""
    attrs: Mapping[str, Any] = image.attrs
    ome = attrs.get("ome")
    multiscales = (ome.get("multiscales") if isinstance(ome, Mapping) else None) or attrs.get("multiscales")
    if not multiscales:
        return None
    return image[str(multiscales[0]["datasets"][0]["path"])]


def open_stores(path: str | Path) -> dict[str, dict[str, AnyArray]]:
    """Open an output directory's OME-Zarr stores read-only: {"raw": {series: zarr.Array}, "refocused": ...}.

    Series are the stores' image groups ("0", "1", ... one per position), each with its full-resolution array.
    """
    import zarr

    out: dict[str, dict[str, AnyArray]] = {}
    for store, name in _STORE_NAMES.items():
        root = Path(path) / store
        if not root.exists():
            continue
        group = zarr.open_group(str(root), mode="r")
        series: dict[str, AnyArray] = {}
        for key, image in group.groups():
            if key != "OME" and isinstance(array := _full_resolution_array(image), zarr.Array):
                series[key] = array
        if not series and isinstance(array := _full_resolution_array(group), zarr.Array):
            series["0"] = array  # a single image at the store's root
        out[name] = series
    return out
