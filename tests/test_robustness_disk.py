"""Full disks, a camera that delivers nothing, and kill -9 (issue 17, part 1): no raw frame acquired is lost,
and no such run says `completed`. `serve --once` runs as a real subprocess on the simulated microscope, writing
into a real tmpfs of a few MiB mounted here (root only: skipped, with the reason, where mounting is refused)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import useq
import yaml
from support import daemon_config, serve_once_command, write_serve_config

from acquire_refocus.config import DriftConfig
from acquire_refocus.control import request
from acquire_refocus.daemon import Daemon
from acquire_refocus.storage import read_focus_log, read_raw_frame_log, read_run_state, stored_frame_count

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(size, read_only) -> a folder on a fresh tmpfs of that size; every mount is removed afterwards."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def write_config(folder: Path, weights: Path, sequence: dict[str, Any], **storage: Any) -> Path:
    return write_serve_config(
        folder / "config.yaml", weights, sequence, focus={"mode": "off"}, storage={"min_free_mb": 0.5, **storage}
    )


def serve_once(config: Path, output: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        serve_once_command(config, output),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(path: Path, rows: int, process: subprocess.Popen[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text(encoding="utf-8").splitlines()) >= rows:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {rows} rows")


def fill(disk: Path, leave_bytes: int) -> None:
    """Another program filling the disk until `leave_bytes` are free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with (disk / "filler.bin").open("wb") as f:
        f.truncate(0)
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            try:
                f.write(b"\1" * chunk)
                f.flush()
            except OSError:
                break
            remaining -= chunk


def assert_no_raw_frame_lost(run: Path) -> int:
    """Every frame the camera delivered is in the raw store, with its metadata line; returns how many."""
    acquired = len(read_raw_frame_log(run / "raw_frames.jsonl"))
    assert stored_frame_count(run / "raw.ome.zarr") == acquired
    assert len(read_focus_log(run / "focus.csv")) == acquired
    return acquired


@pytest.mark.parametrize(("size", "loops"), [("4m", 40), ("600k", 10)], ids=["4MiB-40-frames", "600KiB-10-frames"])
def test_a_run_that_cannot_fit_is_refused_before_the_first_frame(
    small_disk: Callable[..., Path], tmp_path: Path, tiny_weights: Path, size: str, loops: int
) -> None:
    disk = small_disk(size)
    config = write_config(tmp_path, tiny_weights, {"time_plan": {"interval": 0, "loops": loops}})
    process = serve_once(config, disk / "run")
    _, err = process.communicate(timeout=180)
    assert process.returncode == 2, err[-2000:]
    assert "free, the run needs" in err and "Traceback" not in err
    assert not (disk / "run" / "raw.ome.zarr").exists() and not (disk / "run" / "run.json").exists()


def test_a_disk_filled_by_another_program_stops_the_run_as_failed_with_no_raw_frame_lost(
    small_disk: Callable[..., Path], tmp_path: Path, tiny_weights: Path
) -> None:
    disk = small_disk("16m")
    config = write_config(tmp_path, tiny_weights, {"time_plan": {"interval": 0.25, "loops": 40}})
    process = serve_once(config, disk / "run")
    wait_for_rows(disk / "run" / "focus.csv", 4, process)
    fill(disk, leave_bytes=2 * 1024 * 1024)  # below the low-water mark (frames in flight + min_free_mb)
    _, err = process.communicate(timeout=180)
    record = read_run_state(disk / "run")
    assert process.returncode == 1, err[-2000:]
    assert record is not None and record["state"] == "failed" and "disk almost full" in record["error"]
    acquired = assert_no_raw_frame_lost(disk / "run")
    assert 3 <= acquired < 40 and record["raw_frames"] == {"acquired": acquired, "on_disk": acquired}


def test_a_disk_filled_to_the_last_byte_fails_the_run_and_says_so(
    small_disk: Callable[..., Path], tmp_path: Path, tiny_weights: Path
) -> None:
    """No space at all, at once (not even for run.json): the run stops and ends failed, and says so in the log;
    run.json keeps its last state, which reads "interrupted" once the process is gone, never "completed"."""
    disk = small_disk("16m")
    config = write_config(tmp_path, tiny_weights, {"time_plan": {"interval": 0.25, "loops": 40}})
    process = serve_once(config, disk / "run")
    wait_for_rows(disk / "run" / "focus.csv", 4, process)
    fill(disk, leave_bytes=0)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 1, err[-2000:]
    done = next(line for line in err.splitlines() if "event=run_done" in line)
    assert 'error="disk almost full: 0.0 MB free' in done
    assert "event=run_record_not_written" in err and "Traceback" not in err
    record = read_run_state(disk / "run")
    assert record is not None and record["state"] == "interrupted"


def test_a_camera_that_delivers_no_frame_is_not_a_completed_run(
    tmp_path: Path, tiny_refocuser: Any, tiny_weights: Path
) -> None:
    """The issue's case: a NaN drift amplitude (refused in a config file, but reachable from Python) makes every
    snap fail; pymmcore-plus logs a warning per frame and the run used to end `completed`."""
    config = daemon_config(tiny_weights, storage={"min_free_mb": 0})
    drift = config.simulator.drift.model_dump()
    drift_nan = DriftConfig.model_construct(**{**drift, "model": "thermal", "amplitude_um": math.nan})  # unvalidated
    config = config.model_copy(update={"simulator": config.simulator.model_copy(update={"drift": drift_nan})})
    with Daemon(config, output_dir=tmp_path, corrector=tiny_refocuser, control=False) as daemon:
        summary = daemon.run(useq.MDASequence(time_plan={"interval": 0, "loops": 10}), tmp_path / "run")
    record = read_run_state(tmp_path / "run")
    assert record is not None and record["state"] == "failed"
    assert (
        summary.error == record["error"] == "the camera delivered 0 of the 10 frames the sequence asked for "
        "(see the acquisition's warnings in the log)"
    )


def test_a_nan_in_a_config_file_is_refused(tmp_path: Path, tiny_weights: Path) -> None:
    config = write_config(tmp_path, tiny_weights, {"time_plan": {"interval": 0, "loops": 10}})
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["simulator"]["drift"] = {"model": "thermal", "amplitude_um": float("nan")}
    data["focus"]["dead_band_um"] = float("inf")
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    process = serve_once(config, tmp_path / "run")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "simulator.drift.amplitude_um: Input should be a finite number" in err
    assert "focus.dead_band_um: Input should be a finite number" in err
    assert not (tmp_path / "run").exists()


def test_a_run_killed_with_sigkill_reads_interrupted_and_keeps_its_frame_metadata(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path,
        tiny_weights,
        {"time_plan": {"interval": 0.25, "loops": 200}, "stage_positions": [{"x": 5, "y": 7, "z": 100}]},
    )
    run = tmp_path / "run"
    process = serve_once(config, run)
    wait_for_rows(run / "raw_frames.jsonl", 4, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    record = read_run_state(run)
    assert record is not None and record["state"] == "interrupted"
    assert json.loads((run / "run.json").read_text(encoding="utf-8"))["state"] == "running"  # as it was left

    from acquire_refocus.cli import main as cli_main

    assert cli_main(["status", "--run", str(run)]) == 1
    assert "state        interrupted" in capsys.readouterr().out

    again = serve_once(config, run)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "already holds a run that was interrupted" in err

    rows = read_raw_frame_log(run / "raw_frames.jsonl")
    on_disk = stored_frame_count(run / "raw.ome.zarr")
    assert len(rows) >= 4 and on_disk <= len(rows)  # no pixels on disk without their metadata
    assert [r["frame"] for r in rows] == list(range(len(rows)))
    first = rows[0]["meta"]
    assert first["position"]["x"] == pytest.approx(5) and first["position"]["y"] == pytest.approx(7)
    assert first["position"]["z"] == pytest.approx(100) and "runner_time_ms" in first


def test_an_onnx_cache_on_a_read_only_disk_says_the_engine_fell_back(
    small_disk: Callable[..., Path], tmp_path: Path, tiny_weights: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    """engine.backend: onnxruntime asked for, its export cannot be cached: the daemon runs on PyTorch and says so
    in the log and in the status reply, not only in a line about the engine chain."""
    pytest.importorskip("onnxruntime")
    cache = small_disk("1m", True)
    config = daemon_config(tiny_weights, engine={"backend": "onnxruntime", "cache_dir": str(cache)})
    with Daemon(config, output_dir=tmp_path):
        status = request(config.publishing.control_address, "status")
    assert status["engine"] == "torch"
    assert status["engine_fallback"] == (
        "engine.backend onnxruntime was asked for but cannot run here "
        "(engine_passed_over in the log says why); running on torch"
    )
    messages = [r.getMessage() for r in engine_log.records]
    assert any("event=engine_fallback requested=onnxruntime engine=torch" in m for m in messages)
    assert any("event=engine_passed_over" in m and "engine=onnxruntime" in m for m in messages)


def test_a_run_request_that_cannot_fit_is_refused_in_the_reply(
    small_disk: Callable[..., Path], tiny_refocuser: Any, tiny_weights: Path
) -> None:
    disk = small_disk("16m")
    config = daemon_config(tiny_weights, storage={"min_free_mb": 0.5})
    with Daemon(config, output_dir=disk, corrector=tiny_refocuser) as daemon:
        address = config.publishing.control_address
        daemon.acquisition_core()
        too_long = request(address, "run", sequence={"time_plan": {"interval": 0, "loops": 200}}, output="long")
        short = request(address, "run", sequence={"time_plan": {"interval": 0, "loops": 2}}, output="short")
        daemon.request_stop("test cleanup")
    assert too_long["ok"] is False and f"{disk}: " in too_long["error"] and "free, the run needs" in too_long["error"]
    assert short["ok"] is True
    assert not (disk / "long").exists()
