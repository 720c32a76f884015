"""pycromanager hook: unit checks in-process, and real acquisitions with pycromanager's Python backend driving
Micro-Manager's own DemoCamera adapters (PyPI mm-test-adapters) in a child process.

The real acquisitions run in a child process with a hard time-out because pycromanager 1.0.2's Python backend
(a) can be started only once per process (its Engine singleton keeps shut-down thread pools), and (b) uses
non-daemon threads that can keep a process alive after a failed acquisition; a child that hangs is killed, the
test fails, pytest never hangs.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from support import PassThrough, Recorder

from acquire_refocus.errors import UserError
from acquire_refocus.hooks.pycromanager import (
    FocusOffsetHook,
    PycromanagerFrameHook,
    run_sequence,
    sequence_to_events,
)
from acquire_refocus.pipeline import FrameInfo, FramePipeline, FrameResult

CHILD_TIMEOUT_S = 150


class QueueRecorder:
    """A real frame consumer for hook tests: `submit` appends to a thread-safe queue, like the pipeline's intake."""

    def __init__(self) -> None:
        self.frames: queue.SimpleQueue[tuple[np.ndarray, FrameInfo]] = queue.SimpleQueue()

    def submit(self, frame: np.ndarray, info: FrameInfo) -> None:
        self.frames.put((frame, info))

    def drain(self) -> list[tuple[np.ndarray, FrameInfo]]:
        out = []
        while not self.frames.empty():
            out.append(self.frames.get())
        return out


class BrokenSink:
    def submit(self, frame: np.ndarray, info: FrameInfo) -> None:
        raise RuntimeError("queue is gone")


# Metadata as pycromanager 1.0.2's Python backend produces it (captured from a DemoCamera run).
PYTHON_BACKEND_METADATA = {
    "Camera": "Camera",
    "Height": 512,
    "Width": 512,
    "PixelType": None,
    "CameraChannelIndex": 0,
    "PixelSize_um": 1.0,
    "ElapsedTime-ms": 0.0,
    "Time": "2026-11-22 03:26:29 -",
    "Axes": {"time": 3, "z": 1},
    "ZPosition_um_Intended": 12.5,
    "Exposure": 10.0,
}


def test_hook_signatures_match_pycromanager_dispatch() -> None:
    # pycromanager counts parameters: image_process_fn needs exactly 2, the Python backend calls hooks with 1.
    hook = PycromanagerFrameHook(QueueRecorder())
    assert list(inspect.signature(hook).parameters) == ["image", "metadata"]
    assert list(inspect.signature(FocusOffsetHook(lambda p, c, t: 0.0)).parameters) == ["event"]


def test_hook_returns_same_frame_and_queues_read_only_view() -> None:
    recorder = QueueRecorder()
    hook = PycromanagerFrameHook(recorder)
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    metadata = dict(PYTHON_BACKEND_METADATA)
    before = time.time()
    returned = hook(image, metadata)
    assert isinstance(returned, tuple) and returned[0] is image and returned[1] is metadata
    assert image.flags.writeable  # pycromanager's copy is untouched
    [(frame, info)] = recorder.drain()
    assert np.shares_memory(frame, image) and not frame.flags.writeable
    assert info.axes == {"t": 3, "z": 1}
    assert info.stage_z_um == 12.5
    assert info.stage_xy_um is None
    assert info.pixel_size_um == 1.0
    assert before <= info.t_acquired <= time.time()
    assert hook.frames_submitted == 1


def test_hook_reads_java_backend_metadata_and_labels() -> None:
    recorder = QueueRecorder()
    hook = PycromanagerFrameHook(recorder, pixel_size_um=None, channel_names=["DAPI", "FITC"])
    java_like = {
        "Axes": {"time": 0, "channel": "FITC", "position": "Pos-B", "row": 2},
        "ZPositionUm": "101.25",
        "XPositionUm": 10.0,
        "YPositionUm": -4.0,
        "PixelSizeUm": 0.0,
        "TimeReceivedByCore": "2026-11-22 03:26:29.250000",
    }
    hook(np.zeros((64, 64), np.uint16), java_like)
    java_like["Axes"] = {"time": 1, "channel": "Cy5", "position": "Pos-A"}
    hook(np.zeros((64, 64), np.uint16), java_like)
    (_, first), (_, second) = recorder.drain()
    assert first.axes == {"t": 0, "c": 1, "p": 0, "row": 2}
    assert second.axes == {"t": 1, "c": 2, "p": 1}  # unknown labels: order of first appearance
    assert first.stage_z_um == 101.25 and first.stage_xy_um == (10.0, -4.0)
    assert first.pixel_size_um is None  # 0 = uncalibrated
    assert first.t_acquired == pytest.approx(
        time.mktime(time.strptime("2026-11-22 03:26:29", "%Y-%m-%d %H:%M:%S")) + 0.25
    )
    override = PycromanagerFrameHook(recorder, pixel_size_um=0.325, focus_device="Piezo")
    override(np.zeros((64, 64), np.uint16), {"Axes": {}, "PiezoPosition_um_Intended": 3.0, "ZPositionUm": 99.0})
    [(_, info)] = recorder.drain()
    assert info.pixel_size_um == 0.325 and info.stage_z_um == 3.0


def test_hook_never_raises_and_keeps_the_raw_frame(caplog: pytest.LogCaptureFixture) -> None:
    hook = PycromanagerFrameHook(BrokenSink())
    image = np.ones((64, 64), np.uint16)
    metadata = dict(PYTHON_BACKEND_METADATA)
    assert hook(image, metadata) == (image, metadata)
    assert hook(image, {"Axes": "not a mapping"})[0] is image
    assert hook.frames_failed == 2 and hook.frames_submitted == 0
    assert "pycromanager_hook_failed" in caplog.text


def test_focus_offset_hook_plans_once_per_time_point() -> None:
    calls: list[tuple[int, float, int]] = []
    answers = iter([1.5, -0.5, float("nan"), 2.0])

    def planner(position: int, centre_um: float, t_index: int) -> float:
        calls.append((position, centre_um, t_index))
        return next(answers)

    hook = FocusOffsetHook(planner, relative_z_um=[-1.0, 0.0, 1.0])
    stack_t0 = [{"axes": {"time": 0, "z": i}, "z": 9.0 + i} for i in range(3)]
    assert [hook(e)["z"] for e in stack_t0] == [10.5, 11.5, 12.5]  # one plan, held for the whole stack
    merged = hook([{"axes": {"time": 1, "z": i}, "z": 9.0 + i} for i in range(3)])  # a hardware sequence
    assert [e["z"] for e in merged] == [8.5, 9.5, 10.5]
    assert hook({"axes": {"time": 2, "z": 0}, "z": 9.0})["z"] == 8.5  # NaN: the previous offset is kept
    assert hook({"axes": {"time": 0, "position": 1}, "z": 5.0})["z"] == 7.0  # positions have their own offsets
    assert hook({"axes": {"time": 3}}) == {"axes": {"time": 3}}  # no Z: nothing to shift
    assert calls == [(0, 10.0, 0), (0, 10.0, 1), (0, 10.0, 2), (1, 5.0, 0)]
    assert hook.offset_um(0) == -0.5 and hook.offset_um(1) == 2.0


def test_focus_offset_hook_survives_a_failing_planner(caplog: pytest.LogCaptureFixture) -> None:
    def broken(position: int, centre_um: float, t_index: int) -> float:
        raise RuntimeError("controller down")

    assert FocusOffsetHook(broken)({"axes": {"time": 0}, "z": 5.0}) == {"axes": {"time": 0}, "z": 5.0}
    assert "focus_offset_unavailable" in caplog.text
    piezo = FocusOffsetHook(lambda p, c, t: 2.0, focus_device="Piezo")
    event = {"axes": {"time": 0}, "stage_positions": [["Piezo", 1.0], ["Other", 1.0]]}
    assert piezo(event)["stage_positions"] == [["Piezo", 3.0], ["Other", 1.0]]


def test_sequence_to_events_converts_useq() -> None:
    sequence = useq.MDASequence(
        time_plan={"interval": 0.5, "loops": 2},
        z_plan={"range": 2, "step": 1},
        channels=[{"config": "DAPI", "exposure": 20}, "FITC"],
        stage_positions=[{"x": 1, "y": 2}, {"x": 3, "y": 4, "z": 50}],
        axis_order="tpcz",
    )
    events = list(sequence_to_events(sequence, z_reference_um=100.0))
    assert len(events) == 2 * 2 * 2 * 3
    first = events[0]
    assert first["axes"] == {"time": 0, "position": 0, "channel": 0, "z": 0}
    assert first["z"] == 99.0 and (first["x"], first["y"]) == (1.0, 2.0)
    assert first["config_group"] == ["Channel", "DAPI"] and first["exposure"] == 20.0
    assert "min_start_time" not in first
    at_position_with_z = [e for e in events if e["axes"]["position"] == 1]
    assert sorted({e["z"] for e in at_position_with_z}) == [49.0, 50.0, 51.0]  # relative to the position's z
    assert events[-1]["min_start_time"] == 0.5
    no_z = list(sequence_to_events(useq.MDASequence(time_plan={"interval": 0, "loops": 2}), z_reference_um=7.0))
    assert [e["z"] for e in no_z] == [7.0, 7.0]
    piezo = list(sequence_to_events(useq.MDASequence(z_plan={"top": 2, "bottom": 0, "step": 1}), focus_device="Piezo"))
    assert [e["stage_positions"] for e in piezo] == [[["Piezo", 0.0]], [["Piezo", 1.0]], [["Piezo", 2.0]]]
    assert all("z" not in e for e in piezo)
    with pytest.raises(ValueError, match="needs z_reference_um"):  # never send a relative offset as absolute Z
        list(sequence_to_events(useq.MDASequence(z_plan={"range": 2, "step": 1})))


def test_events_are_converted_as_they_are_acquired_in_bounded_calls() -> None:
    """A day at 10 frames a second on 2 positions: the first event comes at once (listing all 1.7 million first
    would hold the acquisition back for minutes), and without the focus loop each acquire call holds at most
    10,000 events; with it, one call per time point and position."""
    from acquire_refocus.hooks.pycromanager import _MAX_BATCH_EVENTS, _batches

    day = useq.MDASequence(time_plan={"interval": 0.1, "loops": 864_000}, stage_positions=[(0, 0, 1), (1, 1, 1)])
    assert next(sequence_to_events(day))["axes"] == {"time": 0, "position": 0}
    short = useq.MDASequence(time_plan={"interval": 0, "loops": 12_000}, stage_positions=[(0, 0, 1), (1, 1, 1)])
    sizes = [len(b) for b in _batches(sequence_to_events(short), per_time_point=False)]
    assert sizes == [_MAX_BATCH_EVENTS, _MAX_BATCH_EVENTS, 4_000]
    per_time_point = list(_batches(sequence_to_events(short), per_time_point=True))
    assert len(per_time_point) == 24_000 and all(len(b) == 1 for b in per_time_point)


def test_sequence_with_autofocus_is_refused() -> None:
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 1},
        autofocus_plan={"autofocus_device_name": "Autofocus", "autofocus_motor_offset": 0, "axes": ("t",)},
    )
    with pytest.raises(UserError, match="not supported with the pycromanager backend"):
        list(sequence_to_events(sequence))


def test_desktop_app_not_running_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 1})
    with pytest.raises(UserError, match=f"not reachable on port {port}.*Run server on port"):
        run_sequence(sequence, QueueRecorder(), directory=tmp_path, port=port)


def test_pycromanager_config_converts_to_pycromanager_events() -> None:
    from acquire_refocus.config import load_config
    from acquire_refocus.daemon import parse_sequence

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "pycromanager.yaml")
    acq = config.acquisition
    assert (acq.backend, acq.pycromanager_port) == ("pycromanager", 4827)
    events = list(sequence_to_events(parse_sequence(acq.sequence), z_reference_um=50.0))
    assert len(events) == 120
    assert events[1] == {
        "axes": {"time": 1, "channel": 0},
        "z": 50.0,
        "config_group": ["Channel", "DAPI"],
        "exposure": 20.0,
        "min_start_time": 30.0,
    }


# --------------------------------------------------------------------------- real DemoCamera acquisitions


def _run_child(tmp_path: Path) -> dict[str, Any]:
    result_file = tmp_path / "child.json"
    # Warnings are errors in the child too, except one: ndstorage 0.1.18 (pycromanager's NDTiff writer) drops a
    # reader without closing its file when a dataset finishes; the data are complete (read back below).
    env = dict(os.environ, PYTHONWARNINGS="error,ignore:unclosed file <_io.BufferedReader name=:ResourceWarning")
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(tmp_path), str(result_file)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pycromanager child process hung and was killed after {CHILD_TIMEOUT_S} s:\n{exc.stderr}")
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("mm_test_adapters")
    return _run_child(tmp_path_factory.mktemp("pycromanager"))


@pytest.mark.timeout(CHILD_TIMEOUT_S + 30)
def test_democamera_z_stack_time_lapse_saved_and_queued(demo_runs: dict[str, Any]) -> None:
    run = demo_runs["zstack"]
    z0 = run["z_reference_um"]
    expected = [(t, z, z0 - 2.0 + 2.0 * z) for t in range(2) for z in range(3)]
    assert run["events"] == run["frames_submitted"] == 6 and run["frames_failed"] == 0
    # pycromanager saved every raw frame (NDTiff on disk, read back by a fresh reader)
    assert sorted((a["time"], a["z"]) for a in run["saved_axes"]) == [(t, z) for t, z, _ in expected]
    assert run["saved_shape"] == [512, 512] and run["saved_dtype"] == "uint16"
    # the hook queued exactly those frames, with useq axes and the commanded Z
    queued = sorted((f["axes"]["t"], f["axes"]["z"], f["stage_z_um"]) for f in run["frames"])
    assert queued == [pytest.approx(e) for e in expected]
    assert {f["status"] for f in run["frames"]} == {"refocused"}
    assert all(f["pixel_size_um"] == 1.0 and f["shape"] == [512, 512] for f in run["frames"])
    assert run["raw_equal_saved"]  # every frame the pipeline got is the frame pycromanager saved
    # no buffer reuse: each frame has its own array (so the hook need not copy), and the frames do differ
    assert run["distinct_buffers"] and run["differs_between_frames"]


@pytest.mark.timeout(CHILD_TIMEOUT_S + 30)
def test_democamera_closed_loop_offset_moves_stage(demo_runs: dict[str, Any]) -> None:
    run = demo_runs["offset"]
    start = run["z_reference_um"]
    offsets = run["offsets_um"]  # what the planner answered, one per time point
    assert run["plans"] == [[0, start, t] for t in range(3)]  # asked once per time point, with the stack centre
    expected = [start + (z - 1) + offsets[t] for t in range(3) for z in range(3)]  # whole stack shifted
    queued = [f["stage_z_um"] for f in sorted(run["frames"], key=lambda f: (f["axes"]["t"], f["axes"]["z"]))]
    assert queued == pytest.approx(expected)
    saved = [z for _, _, z in sorted(run["saved_z"])]
    assert saved == pytest.approx(expected)  # pycromanager's own metadata agrees
    assert run["stage_z_after_um"] == pytest.approx(expected[-1])  # the DemoCamera Z stage really moved


@pytest.mark.timeout(CHILD_TIMEOUT_S + 30)
def test_democamera_channels_and_plain_acquisition(demo_runs: dict[str, Any]) -> None:
    run = demo_runs["channels"]
    assert sorted((f["axes"]["t"], f["axes"]["c"]) for f in run["frames"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert run["in_ram"] and run["submitted"] == 4
    plain = demo_runs["plain"]  # the hook given straight to pycromanager.Acquisition, as in a user script
    assert plain["saved_count"] == plain["queued"] == 3
    assert sorted(plain["z"]) == pytest.approx([0.0, 1.5, 3.0])


@pytest.mark.timeout(CHILD_TIMEOUT_S + 30)
def test_democamera_stop_event_aborts_and_keeps_raw(demo_runs: dict[str, Any]) -> None:
    run = demo_runs["stopped"]
    assert run["aborted"]
    assert 3 <= run["submitted"] < 100
    assert run["saved"] == run["submitted"] == run["delivered"]  # every frame taken is saved and was queued


# --------------------------------------------------------------------------- child process


def _frames(results: list[FrameResult]) -> list[dict[str, Any]]:
    return [
        {
            "axes": r.info.axes,
            "stage_z_um": r.info.stage_z_um,
            "pixel_size_um": r.info.pixel_size_um,
            "status": r.status,
            "shape": list(r.raw.shape),
        }
        for r in results
    ]


def _child(workdir: Path, result_file: Path) -> None:  # pragma: no cover - runs in the child process
    import mm_test_adapters
    from ndstorage import Dataset
    from pycromanager import Acquisition, multi_d_acquisition_events

    from acquire_refocus.hooks.pycromanager import headless_python_backend

    adapters = mm_test_adapters.device_adapter_path()
    out: dict[str, Any] = {}
    with headless_python_backend(Path(adapters) / "MMConfig_demo.cfg", adapters) as core:
        core.set_position("Z", 20.0)

        # 1. a useq time-lapse of relative Z stacks, raw data saved to disk by pycromanager
        collect = Recorder()
        with FramePipeline(PassThrough(), [collect]) as pipeline:
            run = run_sequence(
                useq.MDASequence(time_plan={"interval": 0, "loops": 2}, z_plan={"range": 4, "step": 2}),
                pipeline,
                directory=workdir / "raw",
                name="zstack",
            )
        dataset = Dataset(str(run.dataset_path))
        saved_axes = list(dataset.get_image_coordinates_list())
        first = collect.results[0]
        saved_first = dataset.read_image(time=first.info.axes["t"], z=first.info.axes["z"])
        raws = [r.raw for r in collect.results]
        raw_equal_saved = all(
            np.array_equal(np.asarray(dataset.read_image(time=r.info.axes["t"], z=r.info.axes["z"])), r.raw)
            for r in collect.results
        )
        distinct = not any(np.shares_memory(a, b) for i, a in enumerate(raws) for b in raws[i + 1 :])
        out["zstack"] = {
            "events": run.events,
            "frames_submitted": run.frames_submitted,
            "frames_failed": run.frames_failed,
            "z_reference_um": 20.0,
            "saved_axes": saved_axes,
            "saved_shape": list(saved_first.shape),
            "saved_dtype": str(saved_first.dtype),
            "frames": _frames(collect.results),
            "raw_equal_saved": raw_equal_saved,
            "distinct_buffers": distinct,
            "differs_between_frames": not np.array_equal(raws[0], raws[1]),
        }
        dataset.close()

        # 2. closed-loop focus: a planner whose offset changes between time points
        offsets: list[float] = []
        plans: list[list[float]] = []

        def planner(position: int, centre_um: float, t_index: int) -> float:
            plans.append([position, centre_um, t_index])
            offsets.append(round(0.75 * len(offsets) - 1.0, 3))
            return offsets[-1]

        core.set_position("Z", 30.0)
        collect = Recorder()
        with FramePipeline(PassThrough(), [collect]) as pipeline:
            run = run_sequence(
                useq.MDASequence(time_plan={"interval": 0, "loops": 3}, z_plan={"range": 2, "step": 1}),
                pipeline,
                focus_planner=planner,
                directory=workdir / "raw",
                name="offset",
            )
        dataset = Dataset(str(run.dataset_path))
        saved_z = [
            (t, z, dataset.read_metadata(time=t, z=z)["ZPosition_um_Intended"]) for t in range(3) for z in range(3)
        ]
        dataset.close()
        out["offset"] = {
            "z_reference_um": 30.0,
            "offsets_um": offsets,
            "plans": plans,
            "frames": _frames(collect.results),
            "saved_z": saved_z,
            "stage_z_after_um": core.get_position("Z"),
        }

        # 3. channels, raw data kept in RAM by pycromanager
        collect = Recorder()
        with FramePipeline(PassThrough(), [collect]) as pipeline:
            run = run_sequence(
                useq.MDASequence(time_plan={"interval": 0, "loops": 2}, channels=["DAPI", "FITC"]),
                pipeline,
                directory=None,
            )
        out["channels"] = {
            "frames": _frames(collect.results),
            "in_ram": run.dataset_path is None,
            "submitted": run.frames_submitted,
        }

        # 4. stopping a long time-lapse from another thread (the daemon's SIGINT / stop command)
        stop = threading.Event()

        class StopAfterThree(Recorder):
            def on_frame(self, result: FrameResult) -> None:
                super().on_frame(result)
                if len(self.results) >= 3:
                    stop.set()

        collect = StopAfterThree()
        with FramePipeline(PassThrough(), [collect]) as pipeline:
            run = run_sequence(
                useq.MDASequence(time_plan={"interval": 0.2, "loops": 100}),
                pipeline,
                directory=workdir / "raw",
                name="stopped",
                stop_event=stop,
            )
        dataset = Dataset(str(run.dataset_path))
        out["stopped"] = {
            "aborted": run.aborted,
            "submitted": run.frames_submitted,
            "saved": len(list(dataset.get_image_coordinates_list())),
            "delivered": len(collect.results),
        }
        dataset.close()

        # 5. the hook given directly to pycromanager.Acquisition with pycromanager's own event builder
        recorder = QueueRecorder()
        with Acquisition(
            directory=str(workdir / "raw"), name="plain", image_process_fn=PycromanagerFrameHook(recorder)
        ) as acquisition:
            acquisition.acquire(multi_d_acquisition_events(z_start=0, z_end=3, z_step=1.5))
        dataset = acquisition.get_dataset()
        queued = recorder.drain()
        out["plain"] = {
            "saved_count": len(list(dataset.get_image_coordinates_list())),
            "queued": len(queued),
            "z": [info.stage_z_um for _, info in queued],
        }
        dataset.close()
    result_file.write_text(json.dumps(out, default=float))


if __name__ == "__main__":  # pragma: no cover - the child process of the DemoCamera tests
    import logging
    import traceback

    logging.basicConfig(level=logging.INFO)
    status = 0
    try:
        _child(Path(sys.argv[1]), Path(sys.argv[2]))
    except BaseException:  # noqa: BLE001 - the child reports any failure, SystemExit too, through its status
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave at once: pycromanager's non-daemon threads must not be able to keep the child alive.
    os._exit(status)


def test_frame_info_names_the_channel_for_the_focus_loop() -> None:
    """pycromanager's channel axis holds the preset name (or an index into the sequence's channels): the loop
    keeps only the driving channel's frames, so the name must reach it."""
    hook = PycromanagerFrameHook(QueueRecorder(), channel_names=["DAPI", "GFP"])
    assert hook.frame_info({"Axes": {"time": 0, "channel": "GFP"}}).channel == "GFP"
    assert hook.frame_info({"Axes": {"time": 0, "channel": 0}}).channel == "DAPI"
    assert hook.frame_info({"Axes": {"time": 0}}).channel is None
