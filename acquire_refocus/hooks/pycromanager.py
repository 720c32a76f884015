"""pycromanager acquisitions (Micro-Manager desktop app, or pycromanager's headless Python backend) -> pipeline.

`PycromanagerFrameHook` is the `image_process_fn` of a `pycromanager.Acquisition`: it hands every frame back to
pycromanager unchanged (so pycromanager saves the raw data exactly as always) and queues it for correction.
`run_sequence` runs a useq-schema `MDASequence` through pycromanager with that hook, and with a
`FocusOffsetHook` as `pre_hardware_hook_fn` that adds the focus controller's Z offset to every event of a time
point just before the hardware moves: closed-loop focus on a scope driven by pycromanager.

Facts about pycromanager 1.0.2 this module is built on (read from its source, checked against the DemoCamera):

- `image_process_fn` is dispatched on `inspect.signature(fn).parameters`: exactly 2 -> `fn(image, metadata)`,
  3 -> `fn(image, metadata, event_queue)`; any other count (`*args`, defaults) aborts the acquisition.
- Its return value: the Java backend accepts an `(image, metadata)` tuple or a list of them; the Python backend
  unpacks it as `pix, tags = result`, so a list breaks it. `None` means "drop this frame": it is never saved.
  The hook therefore always returns the one `(image, metadata)` tuple it was given.
- An exception raised by `image_process_fn` aborts the acquisition and loses that frame, so the hook never raises.
- Hardware hooks: the Python backend always calls `hook(event)` with ONE argument (a two-argument hook raises
  TypeError there, which aborts the acquisition); the Java backend accepts one or two. The event is a dict, or a
  list of dicts when the engine merged events into a hardware sequence; returning None cancels the event, and an
  exception aborts. `FocusOffsetHook` is one-argument, handles both shapes and never raises.
- Event "tags" break the Python backend (its AcquisitionEvent calls setTags/getTags, which it does not define), so
  the events built here carry none.
- Frame buffers are not reused: the Python backend copies each frame out of the core (pymmcore's getImage /
  popNextImage return a new array) and the Java backend deserialises each frame from its own ZeroMQ message. So
  the hook does not copy; it queues a read-only view (no pixel copy), so correction code cannot alter the raw frame
  that pycromanager is about to save.
- The Python backend's acquisition Engine is a process-wide singleton: after `stop_headless` its thread pools are
  shut down and a second `start_headless` in the same process silently reuses the dead one. One headless session
  per process (`headless_python_backend` says so instead of hanging).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import useq

from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.pipeline import FrameInfo
from acquire_refocus.sequence import event_axes, nested_event_count

log = logging.getLogger(__name__)

# pycromanager's axis names -> useq's. Axes not listed keep their own name.
_USEQ_AXIS = {"time": "t", "position": "p", "z": "z", "channel": "c"}
_PYCRO_AXIS = {v: k for k, v in _USEQ_AXIS.items()}

# Metadata keys, most trusted first: pycromanager's acquisition engine (both backends) writes "..._Intended"
# (the commanded position, including any focus offset a hook added); MMCore's own frame metadata has "...Um".
_Z_KEYS = ("ZPosition_um_Intended", "ZPositionUm", "ZPosition_um")
_X_KEYS = ("XPosition_um_Intended", "XPositionUm", "XPosition_um")
_Y_KEYS = ("YPosition_um_Intended", "YPositionUm", "YPosition_um")
_PIXEL_SIZE_KEYS = ("PixelSize_um", "PixelSizeUm")
_LOG_EVERY_FAILURES = 100


class FrameIntake(Protocol):
    """What the hook feeds: `acquire_refocus.pipeline.FramePipeline`, or anything with the same `submit`."""

    def submit(self, frame: np.ndarray, info: FrameInfo) -> None: ...


def _number(metadata: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = metadata.get(key)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return number
    return None


class PycromanagerFrameHook:
    """`image_process_fn` for `pycromanager.Acquisition`: returns the frame untouched and queues it for correction.

    Metadata -> FrameInfo: axes from pycromanager's "Axes" (time/position/z/channel renamed to useq's t/p/z/c;
    string values such as channel names become indices in order of first appearance, or by `channel_names`);
    stage Z from the commanded focus position (or `focus_device`'s, when events drive a stage other than the
    core's focus device); XY likewise; pixel size from the core's calibration unless `pixel_size_um` overrides it
    (an uncalibrated 0 becomes None); time from MMCore's "TimeReceivedByCore" when present (Java backend), else
    the moment the frame reaches the hook (pycromanager's own "Time" tag has one-second resolution).
    """

    def __init__(
        self,
        pipeline: FrameIntake,
        *,
        pixel_size_um: float | None = None,
        channel_names: Sequence[str] = (),
        focus_device: str | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._pixel_size_um = pixel_size_um
        self._z_keys = ((f"{focus_device}Position_um_Intended",) if focus_device else ()) + _Z_KEYS
        self._labels: dict[str, dict[Any, int]] = {"c": {name: i for i, name in enumerate(channel_names)}}
        self.frames_submitted = 0
        self.frames_failed = 0

    # Exactly two parameters: pycromanager picks the calling convention by counting them.
    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            info = self.frame_info(metadata)
            view = image.view()
            view.flags.writeable = False
            self._pipeline.submit(view, info)
            self.frames_submitted += 1
        except Exception as exc:  # noqa: BLE001 - raised here it would abort pycromanager's acquisition and lose the raw frame
            self.frames_failed += 1
            if self.frames_failed % _LOG_EVERY_FAILURES == 1:
                log.warning(kv("pycromanager_hook_failed", error=repr(exc), failures=self.frames_failed))
        return image, metadata

    def frame_info(self, metadata: Mapping[str, Any]) -> FrameInfo:
        """Build the FrameInfo of one frame from pycromanager's metadata."""
        x_um, y_um = _number(metadata, _X_KEYS), _number(metadata, _Y_KEYS)
        pixel_size_um = self._pixel_size_um
        if pixel_size_um is None:
            pixel_size_um = _number(metadata, _PIXEL_SIZE_KEYS) or None
        return FrameInfo(
            axes=self._axes(metadata.get("Axes") or {}),
            stage_z_um=_number(metadata, self._z_keys),
            stage_xy_um=(x_um, y_um) if x_um is not None and y_um is not None else None,
            t_acquired=self._time(metadata),
            pixel_size_um=pixel_size_um,
            channel=self._channel((metadata.get("Axes") or {}).get("channel")),
        )

    def _channel(self, value: Any) -> str | None:
        """The channel preset's name from pycromanager's channel axis (a name, or an index into the sequence's)."""
        if isinstance(value, str):
            return value
        names = list(self._labels["c"])
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(names):
            return str(names[int(value)])
        return None

    def _axes(self, axes: Mapping[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, value in axes.items():
            key = _USEQ_AXIS.get(name, name)
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                out[key] = int(value)
            else:  # a label (channel preset, position name): index in order of first appearance
                labels = self._labels.setdefault(key, {})
                out[key] = labels.setdefault(value, len(labels))
        return out

    @staticmethod
    def _time(metadata: Mapping[str, Any]) -> float:
        stamp = metadata.get("TimeReceivedByCore")
        if isinstance(stamp, str) and stamp:
            try:
                return datetime.datetime.fromisoformat(stamp).timestamp()  # local time, as MMCore writes it
            except ValueError:
                pass
        return time.time()


ZOffsetPlanner = Callable[[int, float, int], float]
"""`(position, centre_z_um, t_index) -> offset_um`: the Z offset to apply at a position's time point, given the
planned centre Z of that time point (the focus controller's `FocusController.plan`)."""


class FocusOffsetHook:
    """`pre_hardware_hook_fn` adding the focus controller's offset to each event's Z just before the hardware moves.

    The planner is asked once per position and time point, when that time point's first event reaches the
    hardware, and its offset is held for the rest of the time point, so a z-stack is never shifted in its middle.
    The centre Z it is given is the event's planned Z minus its plane's place in a relative z plan
    (`relative_z_um`, in z-index order). A planner that fails or answers a non-finite number is logged and the
    position's previous offset is kept: a focus-controller fault must not abort the acquisition (an exception in
    a pycromanager hook aborts it). Events without a Z are left alone; `run_sequence` gives every event one.
    """

    def __init__(
        self,
        planner: ZOffsetPlanner,
        relative_z_um: Sequence[float] = (),
        focus_device: str | None = None,
    ) -> None:
        self._planner = planner
        self._relative_z_um = [float(z) for z in relative_z_um]
        self._focus_device = focus_device
        self._held: dict[int, tuple[int, float]] = {}  # position -> (time index, offset_um)

    def offset_um(self, position: int = 0) -> float:
        """The offset applied at a position's latest time point."""
        return self._held.get(position, (0, 0.0))[1]

    # Exactly one parameter: pycromanager's Python backend calls hardware hooks with the event alone.
    def __call__(self, event: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
        for single in event if isinstance(event, list) else (event,):
            z_um = self._z_of(single)
            if z_um is None:
                continue
            offset_um = self._offset_for(single, z_um)
            if offset_um == 0.0:
                continue
            if self._focus_device is None:
                single["z"] = z_um + offset_um
            else:
                for entry in single["stage_positions"]:
                    if entry[0] == self._focus_device:
                        entry[1] = z_um + offset_um
        return event

    def _z_of(self, event: dict[str, Any]) -> float | None:
        if self._focus_device is None:
            z = event.get("z")
        else:
            z = next((e[1] for e in event.get("stage_positions", ()) if e[0] == self._focus_device), None)
        return None if z is None else float(z)

    def _offset_for(self, event: dict[str, Any], z_um: float) -> float:
        axes = event.get("axes", {})
        position, t_index = axes.get("position", 0), axes.get("time", 0)
        position = position if isinstance(position, int) else 0
        t_index = t_index if isinstance(t_index, int) else 0
        held = self._held.get(position)
        if held is not None and held[0] == t_index:
            return held[1]
        previous_um = held[1] if held is not None else 0.0
        z_index = axes.get("z")
        relative_um = (
            self._relative_z_um[z_index]
            if isinstance(z_index, int) and 0 <= z_index < len(self._relative_z_um)
            else 0.0
        )
        try:
            offset_um = float(self._planner(position, z_um - relative_um, t_index))
        except Exception as exc:  # noqa: BLE001 - raised in a hardware hook it would abort the acquisition; logged
            log.warning(kv("focus_offset_unavailable", position=position, t=t_index, error=repr(exc)))
            offset_um = previous_um
        if not math.isfinite(offset_um):
            log.warning(kv("focus_offset_not_finite", position=position, t=t_index, offset_um=offset_um))
            offset_um = previous_um
        self._held[position] = (t_index, offset_um)
        return offset_um


def sequence_to_events(
    sequence: useq.MDASequence,
    *,
    z_reference_um: float | None = None,
    focus_device: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Convert a useq MDASequence into pycromanager acquisition events, one at a time, as `run_sequence` submits
    them (pycromanager queues all it is given at once, ~20 us per event, so a long time-lapse is not held back
    by a conversion of every event before the first is submitted).

    Axes use pycromanager's names (time, position, z, channel) with integer indices. A relative Z plan at a
    position without its own Z is taken relative to `z_reference_um` (the stage Z when the run starts), as in
    Micro-Manager's MDA; when `z_reference_um` is given, events without any Z get it, so the focus offset hook
    always has a Z to shift. With `focus_device`, Z goes to that stage through "stage_positions" instead of the
    core's focus device.
    """
    z_plan = sequence.z_plan
    relative_z = z_plan is not None and z_plan.is_relative
    for mda_event in sequence:
        if not isinstance(mda_event.action, useq.AcquireImage):
            raise UserError(
                f"acquisition.sequence: action {mda_event.action.type!r} is not supported with the pycromanager "
                "backend (only image acquisition); remove the autofocus_plan or custom actions"
            )
        index = event_axes(mda_event)
        event: dict[str, Any] = {"axes": {_PYCRO_AXIS.get(k, k): v for k, v in index.items()}}
        z_um = mda_event.z_pos
        if z_um is not None and relative_z:
            p_index = index.get("p")
            position = sequence.stage_positions[p_index] if p_index is not None and sequence.stage_positions else None
            if position is None or position.z is None:
                if z_reference_um is None:  # useq's z is then an offset; sent as is it would be an absolute move
                    raise ValueError("a relative z plan at a position without z needs z_reference_um")
                z_um = z_reference_um + z_um
        if z_um is None:
            z_um = z_reference_um
        if z_um is not None:
            if focus_device is None:
                event["z"] = float(z_um)
            else:
                event["stage_positions"] = [[focus_device, float(z_um)]]
        if mda_event.x_pos is not None and mda_event.y_pos is not None:
            event["x"], event["y"] = float(mda_event.x_pos), float(mda_event.y_pos)
        if mda_event.channel is not None:
            event["config_group"] = [mda_event.channel.group, mda_event.channel.config]
        if mda_event.exposure is not None:
            event["exposure"] = float(mda_event.exposure)
        if mda_event.min_start_time:
            event["min_start_time"] = float(mda_event.min_start_time)
        if mda_event.properties:
            event["properties"] = [
                [prop.device_name, prop.property_name, prop.property_value] for prop in mda_event.properties
            ]
        yield event


@dataclass(frozen=True)
class PycromanagerRun:
    """What a finished `run_sequence` produced."""

    dataset_path: Path | None  # pycromanager's NDTiff raw data; None when kept in RAM (no directory)
    events: int  # events submitted to pycromanager
    frames_submitted: int  # frames handed to the pipeline
    frames_failed: int  # frames whose hand-over failed (still saved raw by pycromanager)
    aborted: bool = False  # stopped early by `stop_event`


_MAX_BATCH_EVENTS = 10_000  # events per `acquire` call without closed-loop focus


def _batches(events: Iterable[dict[str, Any]], *, per_time_point: bool) -> Iterator[list[dict[str, Any]]]:
    """Split events into `acquire` calls. pycromanager merges consecutive events of one call into a hardware
    sequence (e.g. a burst of time points at the same Z) and runs the pre-hardware hook once per sequence; with
    closed-loop focus each time point (and position) gets its own call, so the offset is updated between them.
    Without, calls hold at most _MAX_BATCH_EVENTS events, so a stop during submission takes effect between them."""
    batch: list[dict[str, Any]] = []
    for event in events:
        key = (event["axes"].get("time"), event["axes"].get("position"))
        new_time_point = bool(batch) and key != (batch[-1]["axes"].get("time"), batch[-1]["axes"].get("position"))
        if (per_time_point and new_time_point) or len(batch) >= _MAX_BATCH_EVENTS:
            yield batch
            batch = []
        batch.append(event)
    if batch:
        yield batch


def _check_desktop_server(port: int) -> None:
    """Fail fast with a clear message instead of pycromanager's socket time-out and stray thread tracebacks."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            pass
    except OSError:
        raise UserError(
            f"Micro-Manager is not reachable on port {port}: start the Micro-Manager desktop application and tick "
            f"Tools > Options > 'Run server on port {port}' (acquisition.pycromanager_port in the config)"
        ) from None


def _python_backend_active() -> bool:
    from mmpycorex import is_pymmcore_active

    return bool(is_pymmcore_active())


def run_sequence(
    sequence: useq.MDASequence,
    pipeline: FrameIntake,
    *,
    directory: str | Path | None,
    focus_planner: ZOffsetPlanner | None = None,
    name: str = "acquire-refocus",
    pixel_size_um: float | None = None,
    focus_device: str | None = None,
    port: int = 4827,
    stop_event: threading.Event | None = None,
) -> PycromanagerRun:
    """Run `sequence` through pycromanager, queueing every frame for correction; blocks until it is done.

    Uses pycromanager's headless Python backend when one is running in this process (`headless_python_backend`),
    otherwise the Micro-Manager desktop application on `port`. Raw frames are saved by pycromanager as NDTiff in
    `directory`/`name`_N (the returned `dataset_path`); with `directory` None pycromanager keeps them in RAM only
    (the desktop app shows them; nothing is written). `focus_planner` (closed-loop focus, e.g.
    `FocusController.plan`) is asked for each position's Z offset when its time point starts; the offset is added
    to that time point's events just before the hardware moves. Setting `stop_event` aborts the acquisition
    (frames already taken stay saved) and returns.
    """
    from pycromanager import AcqNotification, Acquisition, Core

    python_backend = _python_backend_active()
    if not python_backend:
        _check_desktop_server(port)
    core = Core() if python_backend else Core(port=port)
    z_reference_um: float | None = None
    needs_reference = focus_planner is not None or (sequence.z_plan is not None and sequence.z_plan.is_relative)
    if needs_reference:
        device = focus_device or core.get_focus_device()
        if not device:
            raise UserError(
                "Micro-Manager has no focus device: set Core-Focus in the hardware configuration or "
                "acquisition.focus_device in the config"
            )
        z_reference_um = float(core.get_position(device))
    if sequence.autofocus_plan is not None:  # checked per event too; here before anything starts
        raise UserError(
            "acquisition.sequence: an autofocus_plan is not supported with the pycromanager backend "
            "(only image acquisition); remove it"
        )
    events = sequence_to_events(sequence, z_reference_um=z_reference_um, focus_device=focus_device)
    first = next(events, None)
    if first is None:
        raise UserError("acquisition.sequence has no events: give it a time_plan, z_plan, channels or positions")
    submitted = 0
    channel_names = [ch.config for ch in sequence.channels]
    hook = PycromanagerFrameHook(
        pipeline, pixel_size_um=pixel_size_um, channel_names=channel_names, focus_device=focus_device
    )
    pre_hardware = None
    if focus_planner is not None:
        relative_z_um = list(sequence.z_plan) if sequence.z_plan is not None and sequence.z_plan.is_relative else []
        pre_hardware = FocusOffsetHook(focus_planner, relative_z_um, focus_device)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    log.info(
        kv(
            "pycromanager_run_start",
            backend="python" if python_backend else f"desktop:{port}",
            events=nested_event_count(sequence),
            directory=directory or "RAM",
        )
    )
    events_done = threading.Event()

    def on_notification(notification: Any) -> None:
        if AcqNotification.is_acquisition_finished_notification(notification):
            events_done.set()

    acquisition = Acquisition(
        directory=None if directory is None else str(directory),
        name=name,
        image_process_fn=hook,
        pre_hardware_hook_fn=pre_hardware,
        notification_callback_fn=on_notification,
        port=port,
    )
    aborted = False
    try:
        for batch in _batches(itertools.chain([first], events), per_time_point=pre_hardware is not None):
            if stop_event is not None and stop_event.is_set():
                break  # pycromanager queues what it is given at once: a stop during submission ends it here
            acquisition.acquire(batch)
            submitted += len(batch)
    finally:
        acquisition.mark_finished()
        while stop_event is not None and not events_done.wait(0.1):
            if stop_event.is_set():
                acquisition.abort()
                aborted = True
                break
        acquisition.await_completion()
    dataset = acquisition.get_dataset()
    dataset_path = Path(dataset.path) if directory is not None else None
    if hasattr(dataset, "close"):
        dataset.close()  # pycromanager leaves the finished dataset's file handles open (ResourceWarning at exit)
    log.info(
        kv(
            "pycromanager_run_done",
            frames=hook.frames_submitted,
            failed=hook.frames_failed,
            aborted=aborted,
            dataset=dataset_path or "RAM",
        )
    )
    return PycromanagerRun(dataset_path, submitted, hook.frames_submitted, hook.frames_failed, aborted)


@contextlib.contextmanager
def headless_python_backend(mm_config_file: str | Path, mm_app_path: str | Path) -> Iterator[Any]:
    """Start pycromanager's headless Python backend (pymmcore, in this process) and stop it on exit.

    `mm_app_path` is the folder with the device adapters (a Micro-Manager installation, or mm-test-adapters'
    `device_adapter_path()`); `mm_config_file` the hardware configuration. Yields pycromanager's core. Only one
    session per process: pycromanager cannot restart its Python engine after stopping it.
    """
    from pycromanager import Core, start_headless, stop_headless
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    config = Path(mm_config_file)
    app = Path(mm_app_path)
    if not config.is_file():
        raise UserError(f"Micro-Manager hardware config not found: {config}")
    if not app.is_dir():
        raise UserError(f"Micro-Manager folder (device adapters) not found: {app}")
    engine = Engine.get_instance()
    if engine is not None and engine.acq_executor._shutdown:  # noqa: SLF001 - pycromanager exposes no state
        raise RuntimeError(
            "pycromanager's Python backend was already stopped in this process and cannot be restarted; "
            "run each headless session in its own process"
        )
    try:
        start_headless(str(app.resolve()), str(config.resolve()), python_backend=True)
    except RuntimeError as exc:  # MMCore's message names the device or adapter that failed
        stop_headless()
        raise UserError(f"{config}: Micro-Manager could not load this hardware configuration: {exc}") from None
    try:
        yield Core()
    finally:
        stop_headless()
