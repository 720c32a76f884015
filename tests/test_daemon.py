"""The daemon end to end on the simulated microscope, through the real Micro-Manager core (pymmcore-plus UniMMCore),
real ZeroMQ sockets on free loopback ports and real files. The engine is a small untrained network (torch)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from support import SEQUENCE, Collector, GatedCorrector, daemon_config, free_tcp_address, written_planes

from acquire_refocus.cli import main as cli_main
from acquire_refocus.control import request
from acquire_refocus.daemon import Daemon
from acquire_refocus.pipeline import FrameResult
from acquire_refocus.storage import open_stores, read_focus_log

pytestmark = pytest.mark.timeout(180)


def test_end_to_end_counts_match_everywhere(tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path) -> None:
    config = daemon_config(tiny_weights)
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        collector = Collector(daemon.publisher.address, expected=24)  # type: ignore[union-attr]
        collector.thread.start()
        daemon.acquisition_core()  # build the microscope first, so the subscriber has joined before frames flow
        summary = daemon.run(useq.MDASequence(**SEQUENCE), tmp_path)
        collector.thread.join(60)
    n = 8
    assert summary.counts()["seen"] == n and summary.counts()["refocused"] == n and not summary.error
    stores = open_stores(tmp_path)
    assert {k: v.shape for k, v in stores["raw"].items()} == {"0": (4, 128, 128), "1": (4, 128, 128)}
    assert {k: v.shape for k, v in stores["refocused"].items()} == {"0": (4, 128, 128), "1": (4, 128, 128)}
    assert written_planes(stores["raw"]) == n and written_planes(stores["refocused"]) == n
    rows = read_focus_log(tmp_path / "focus.csv")
    assert sorted(r["frame"] for r in rows) == list(range(n)) and all(r["refocused"] for r in rows)
    assert collector.topics() == {"raw": n, "refocused": n, "focus": n}
    assert collector.sub.missed == 0
    # raw frames published are the ones saved
    for header in collector.headers:
        if header["topic"] == "raw":
            assert header["stage_z_um"] == pytest.approx(100.0) and header["engine"] == "torch"
        assert header["focus_offset_um"] == 0.0  # observe mode: the loop plans, never moves
    assert all(r["focus_offset_um"] == 0.0 for r in rows)
    record = (tmp_path / "run.json").read_text()
    assert '"state": "completed"' in record and '"seen": 8' in record


def test_engine_slower_than_the_camera_loses_no_raw_frame(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    """The engine is stuck until every frame has been taken: raw data complete, skips counted and logged."""
    n = 10
    corrector = GatedCorrector(tiny_refocuser)

    class OpenGateAfterLastFrame:
        def on_frame(self, result: FrameResult) -> None:
            if result.frame == n - 1:
                corrector.gate.set()

        def close(self) -> None:
            corrector.gate.set()

    config = daemon_config(tiny_weights, pipeline={"queue_size": 2, "overflow": "all"}, publishing={"enabled": False})
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": n}, stage_positions=[(0, 0, 100)])
    with Daemon(
        config, output_dir=tmp_path, corrector=corrector, control=False, extra_sinks=lambda: [OpenGateAfterLastFrame()]
    ) as daemon:
        summary = daemon.run(sequence, tmp_path)
    counts = summary.counts()
    assert counts["seen"] == n and counts["refocused"] == 3 and counts["skipped"] == n - 3
    stores = open_stores(tmp_path)
    assert written_planes(stores["raw"]) == n  # every raw frame saved
    assert written_planes(stores["refocused"]) == 3
    rows = read_focus_log(tmp_path / "focus.csv")
    assert len(rows) == n
    assert sorted(r["frame"] for r in rows if not r["refocused"]) == list(range(3, n))
    assert all(r["status"] == "skipped" for r in rows if not r["refocused"])


def test_control_pause_resume_run_stop(tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path) -> None:
    config = daemon_config(tiny_weights)
    address = config.publishing.control_address
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        exit_code: list[int] = []
        server = threading.Thread(target=lambda: exit_code.append(daemon.serve(handle_signals=False)), daemon=True)
        server.start()
        try:
            status = request(address, "status")
            assert status["ok"] and status["state"] == "idle" and status["engine"] == "torch"
            assert request(address, "pause")["paused"] is True
            first = request(address, "run", sequence=SEQUENCE)
            assert first["ok"] and first["run"] == "run-001"
            assert request(address, "run", sequence={"time_plan": "nonsense"})["ok"] is False
            _wait_for_run(daemon, "run-001")
            into_a_run = request(address, "run", sequence=SEQUENCE, output=str(tmp_path / "run-001"))
            assert into_a_run["ok"] is False and "already holds a run" in into_a_run["error"]
            paused = request(address, "status")
            assert paused["paused"] is True and paused["counts"]["paused_frames"] == 8
            assert paused["counts"]["refocused"] == 0
            assert request(address, "resume")["paused"] is False
            assert request(address, "run", sequence=SEQUENCE)["run"] == "run-002"
            _wait_for_run(daemon, "run-002")
            resumed = request(address, "status")
            assert resumed["counts"]["refocused"] == 8 and resumed["run"] == "run-002"
            assert resumed["publishing"]["published"] > 0 and resumed["focus"]["mode"] == "observe"
            assert request(address, "stop")["stopping"] is True
            server.join(60)
        finally:
            daemon.request_stop("test cleanup")
            server.join(60)
    assert exit_code == [0]
    for run in ("run-001", "run-002"):
        assert len(read_focus_log(tmp_path / run / "focus.csv")) == 8


def _wait_for_run(daemon: Daemon, run_id: str) -> None:
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            status = request(daemon.config.publishing.control_address, "status")
            if status["run"] == run_id and status["state"] == "idle":
                done.set()
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    poller.join(120)
    assert done.is_set(), f"{run_id} did not finish"


def test_listen_prints_the_focus_trace(tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path) -> None:
    config = daemon_config(tiny_weights)
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        daemon.acquisition_core()
        listener = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "acquire_refocus.cli",
                "listen",
                "--address",
                daemon.publisher.address,  # type: ignore[union-attr]
                "--topic",
                "focus",
                "--topic",
                "raw",
                "--count",
                "16",
                "--timeout",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline().startswith("listening on")
            # a PUB/SUB subscription takes a moment to reach the publisher: run until the listener has its 16
            for _ in range(5):
                daemon.run(useq.MDASequence(**SEQUENCE), None)
                if listener.poll() is not None:
                    break
            out, err = listener.communicate(timeout=60)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
    assert listener.returncode == 0, err
    trace = [line for line in out.splitlines() if line.startswith("focus frame=")]
    assert trace and "defocus_um=" in trace[0] and "stage_z_um=100.000" in trace[0]
    assert "focus_offset_um=+0.000" in trace[0]
    rates = [line for line in out.splitlines() if line.startswith("rates ")]
    assert rates and "raw=" in rates[-1] and "focus=" in rates[-1] and "missed=" in rates[-1]


def test_control_commands_without_a_daemon(capsys: pytest.CaptureFixture[str], tcp_address: Callable[[], str]) -> None:
    assert cli_main(["status", "--address", tcp_address(), "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "no acquire-refocus daemon answered" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        ({"time_plan": {"interval": 0, "loops": 3}, "stage_positons": [[0, 0, 100]]}, "unknown key(s) stage_positons"),
        ({"time_plan": {"interval": 0, "loops": 100_000_000}}, "100,000,000 events (t=100000000)"),
        ({"channels": [{"config": "DAPI", "exposre": 10}]}, "unknown key(s) channels.0.exposre"),
        ({"z_plan": {"range": 2, "step": 1, "go_upp": False}}, "unknown key(s) z_plan.go_upp"),
        ({"z_plan": {"range": 1e9, "step": 0.001}}, "1,000,000,000,001 events (z=1000000000001) is more than"),
        ({"time_plan": {"interval": 0, "duration": 3600}}, "size cannot be worked out (ZeroDivisionError"),
    ],
    ids=[
        "misspelt-key",
        "too-many-events",
        "misspelt-channel-key",
        "misspelt-z-plan-key",
        "z-plan-of-a-trillion",
        "duration-without-interval",
    ],
)
def test_a_sequence_that_would_not_run_as_meant_is_refused(sequence: dict, message: str) -> None:
    from acquire_refocus.errors import ConfigError
    from acquire_refocus.sequence import parse_sequence

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_sequence(sequence)


def test_run_command_rejects_a_bad_sequence_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "seq.yaml"
    bad.write_text("time_plan: {loops: many}\n")
    assert cli_main(["run", str(bad), "--address", free_tcp_address(), "--timeout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "not a valid useq-schema MDASequence" in err and str(bad) in err


def test_pymmcore_plus_backend_on_micro_manager_demo_devices(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    """A real Micro-Manager configuration (the DemoCamera devices of mm-test-adapters) in a CMMCorePlus, closed
    loop on: raw data with the sequence's axes, z-stacks shifted as a whole between time points."""
    from mm_test_adapters import device_adapter_path

    adapters = Path(device_adapter_path())
    sequence = {
        "time_plan": {"interval": 0, "loops": 3},
        "z_plan": {"range": 2, "step": 2},
        "axis_order": "tz",
        "channels": [{"group": "Channel", "config": "DAPI", "exposure": 5}],
    }
    config = daemon_config(
        tiny_weights,
        focus={"mode": "correct", "z_limits_um": [-50, 50], "dead_band_um": 0.0, "min_confidence": 0.0},
        acquisition={
            "backend": "pymmcore-plus",
            "mm_config_file": str(adapters / "MMConfig_demo.cfg"),
            "mm_app_path": str(adapters),
            "sequence": sequence,
        },
    )
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        daemon.acquisition_core().setROI(0, 0, 128, 128)
        summary = daemon.run(useq.MDASequence(**sequence), tmp_path)
    assert summary.counts()["seen"] == 6 and not summary.error
    raw = open_stores(tmp_path)["raw"]
    assert {k: v.shape for k, v in raw.items()} == {"0": (3, 2, 128, 128)}
    assert open_stores(tmp_path)["refocused"]["0"].shape == (3, 2, 128, 128)
    rows = read_focus_log(tmp_path / "focus.csv")
    assert len(rows) == 6
    z = {(r["axes"]["t"], r["axes"]["z"]): r["stage_z_um"] for r in rows}
    for t in range(3):
        assert z[(t, 1)] - z[(t, 0)] == pytest.approx(2.0)  # the stack keeps its shape
    assert all(-50 <= v <= 50 for v in z.values())
    # focus.csv says how far the loop had moved each frame from its planned Z: the same for a stack's planes
    offset = {(r["axes"]["t"], r["axes"]["z"]): r["focus_offset_um"] for r in rows}
    for t in range(3):
        assert offset[(t, 0)] == offset[(t, 1)]
        assert z[(t, 0)] - offset[(t, 0)] == pytest.approx(z[(0, 0)] - offset[(0, 0)], abs=1e-3)
    assert offset[(0, 0)] == 0.0 and offset[(2, 0)] != 0.0
    assert summary.focus["moves"] >= 1  # the untrained network is never exactly in focus: the loop moved Z


def test_two_queued_runs_into_one_output_are_refused_in_the_reply(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    """Nothing takes runs off the queue here (no serve loop): both wait, and the second would have failed later,
    in the daemon's log only, because the first will have written there."""
    config = daemon_config(tiny_weights)
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        address = config.publishing.control_address
        first = request(address, "run", sequence=SEQUENCE, output=str(tmp_path / "shared"))
        second = request(address, "run", sequence=SEQUENCE, output=str(tmp_path / "shared"))
        other = request(address, "run", sequence=SEQUENCE, output=str(tmp_path / "other"))
        assert first["ok"] and other["ok"]
        assert second["ok"] is False and "a run queued before this one writes there" in second["error"]
        daemon.request_stop("test cleanup")


def test_a_channel_the_hardware_lacks_is_refused_before_the_first_frame(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    from mm_test_adapters import device_adapter_path

    from acquire_refocus.errors import UserError

    adapters = Path(device_adapter_path())
    sequence = {"time_plan": {"interval": 0, "loops": 2}, "channels": [{"group": "Channel", "config": "DAPPI"}]}
    config = daemon_config(
        tiny_weights,
        acquisition={
            "backend": "pymmcore-plus",
            "mm_config_file": str(adapters / "MMConfig_demo.cfg"),
            "mm_app_path": str(adapters),
            "sequence": sequence,
        },
    )
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        with pytest.raises(UserError, match=r"channel 'DAPPI' is not a preset of group 'Channel' \(presets: .*DAPI"):
            daemon.run(useq.MDASequence(**sequence), tmp_path / "run")
        assert list((tmp_path / "run").iterdir()) == []  # no store opened: the corrected run may use the folder
        fixed = {**sequence, "channels": [{"group": "Channel", "config": "DAPI"}]}
        daemon.acquisition_core().setROI(0, 0, 128, 128)
        assert daemon.run(useq.MDASequence(**fixed), tmp_path / "run").counts()["seen"] == 2


def test_a_pixel_size_the_model_cannot_be_resampled_to_is_refused_before_the_run(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    from acquire_refocus.errors import InputError

    config = daemon_config(tiny_weights, acquisition={"pixel_size_um": 32.5})  # 100x the model's: a typo
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        with pytest.raises(InputError, match="more than 16 times from the model's"):
            daemon.run(useq.MDASequence(**SEQUENCE), tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []


def test_hold_start_with_single_planes_is_refused_before_the_run(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    from acquire_refocus.errors import UserError

    config = daemon_config(tiny_weights, focus={"mode": "correct", "fine_source": "sharpness", "hold": "start"})
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser) as daemon:
        with pytest.raises(UserError, match="needs a z_plan of 3 or more planes"):
            daemon.run(useq.MDASequence(**SEQUENCE), tmp_path / "run")
        reply = request(config.publishing.control_address, "run", sequence=SEQUENCE, output=str(tmp_path / "queued"))
        assert reply["ok"] is False and "needs a z_plan of 3 or more planes" in reply["error"]  # in the reply
        assert not (tmp_path / "queued").exists()
        stacks = {**SEQUENCE, "time_plan": {"interval": 0, "loops": 1}, "z_plan": {"range": 2, "step": 1}}
        assert daemon.run(useq.MDASequence(**{**stacks, "axis_order": "tpz"}), tmp_path / "run").counts()["seen"] == 6


def test_closed_loop_moves_between_time_points_of_a_single_position(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    """One position, no interval: pymmcore-plus would merge the whole time-lapse into one hardware sequence.
    The focus engine keeps time points apart, so Z can change at each, and waits for the estimates."""
    config = daemon_config(
        tiny_weights,
        focus={"mode": "correct", "min_confidence": 0.0, "dead_band_um": 0.0},
        publishing={"enabled": False},
    )
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 6}, stage_positions=[(0, 0, 100)])
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser, control=False) as daemon:
        summary = daemon.run(sequence, tmp_path)
    counts = summary.counts()
    assert counts["refocused"] == 6 and counts["skipped"] == 0  # waited for each estimate: nothing piled up
    rows = sorted(read_focus_log(tmp_path / "focus.csv"), key=lambda r: r["frame"])
    z = [r["stage_z_um"] for r in rows]
    # the untrained network reports a steady defocus, so the loop steps Z at every time point after the first
    assert z[0] == pytest.approx(100.0) and len(set(z)) == 6
    assert summary.focus["moves"] == 5
    assert [r["focus_offset_um"] for r in rows] == pytest.approx([v - 100.0 for v in z], abs=1e-3)


def test_bad_frames_pass_every_sink_raw(tmp_path: Path, tiny_refocuser: Any) -> None:
    """NaN, 3-D and non-array frames next to good ones: counted as failed, published raw when they are arrays,
    logged in focus.csv, left empty in the refocused store; no sink fails."""
    import time

    from acquire_refocus.config import FocusConfig, PipelineConfig, PublishingConfig
    from acquire_refocus.focus import FocusController
    from acquire_refocus.pipeline import FrameInfo, FramePipeline
    from acquire_refocus.publishing import Publisher, PublishSink
    from acquire_refocus.storage import FocusLog, RefocusedStore

    good = np.full((128, 128), 500, np.uint16)
    frames = [good, np.full((128, 128), np.nan, np.float32), np.ones((2, 128, 128), np.uint16), None, good]
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": len(frames)})
    publisher = Publisher(PublishingConfig(pub_address=free_tcp_address()))
    collector = Collector(publisher.address, expected=4 + 2 + 5)  # raw: 4 arrays; refocused: 2; focus: 5
    collector.thread.start()
    time.sleep(1.0)  # let the subscription reach the publisher (loopback: milliseconds)
    sinks = [
        FocusController(FocusConfig(mode="observe")),
        PublishSink(publisher),
        RefocusedStore(tmp_path / "refocused.ome.zarr", sequence, (128, 128)),
        FocusLog(tmp_path / "focus.csv"),
    ]
    try:
        with FramePipeline(tiny_refocuser, sinks, PipelineConfig()) as pipeline:
            for t, frame in enumerate(frames):
                pipeline.submit(frame, FrameInfo({"t": t}, 100.0, (0.0, 0.0), time.time(), 0.325))
        collector.thread.join(60)
    finally:
        publisher.close()
    stats = pipeline.stats()
    assert (stats.refocused, stats.failed, stats.sink_errors) == (2, 3, 0)
    rows = sorted(read_focus_log(tmp_path / "focus.csv"), key=lambda r: r["frame"])
    assert [r["status"] for r in rows] == ["refocused", "failed", "failed", "failed", "refocused"]
    assert collector.topics() == {"raw": 4, "refocused": 2, "focus": 5}
    refocused = open_stores(tmp_path)["refocused"]["0"]
    assert [bool(np.any(refocused[t])) for t in range(5)] == [True, False, False, False, True]
