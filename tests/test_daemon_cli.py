"""`acquire-refocus serve` as a real process: signals, kill -9, bad configs. Every process is waited for or killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support import serve_once_command, write_serve_config

from acquire_refocus.storage import open_stores, read_focus_log

pytestmark = pytest.mark.timeout(240)


def write_config(path: Path, weights: Path, loops: int) -> Path:
    return write_serve_config(
        path, weights, {"time_plan": {"interval": 0, "loops": loops}, "stage_positions": [{"x": 0, "y": 0, "z": 100}]}
    )


def start_serve(config: Path, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        serve_once_command(config, output),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def wait_for_rows(output: Path, proc: subprocess.Popen, rows: int, timeout_s: float = 150.0) -> None:
    """Until focus.csv has `rows` frames (the run is under way); fails if the process ends first."""
    deadline = time.monotonic() + timeout_s
    log = output / "focus.csv"
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) > rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"serve ended early (rc {proc.returncode}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"focus.csv never reached {rows} rows")


def raw_planes(output: Path) -> int:
    series = open_stores(output)["raw"]
    return sum(int(np.count_nonzero(a[:].reshape(a.shape[0], -1).any(axis=1))) for a in series.values())


def test_sigterm_mid_run_drains_closes_and_exits_0(
    tmp_path: Path, tiny_weights: Path, processes: list[subprocess.Popen]
) -> None:
    output = tmp_path / "out"
    proc = start_serve(write_config(tmp_path / "c.yaml", tiny_weights, loops=500), output)
    processes.append(proc)
    wait_for_rows(output, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "daemon_stopping" in err and "reason=SIGTERM" in err
    record: dict[str, Any] = json.loads((output / "run.json").read_text())
    assert record["state"] == "cancelled"
    seen = record["counts"]["seen"]
    assert 3 <= seen < 500
    assert record["counts"]["queue_depth"] == 0 and record["counts"]["delivered"] == seen  # drained
    rows = read_focus_log(output / "focus.csv")
    assert sorted(r["frame"] for r in rows) == list(range(seen))
    assert raw_planes(output) == seen  # every acquired frame saved raw, store closed properly
    refocused = open_stores(output)["refocused"]
    assert refocused["0"].shape == (500, 128, 128)


def test_kill_9_mid_run_leaves_readable_data(
    tmp_path: Path, tiny_weights: Path, processes: list[subprocess.Popen]
) -> None:
    output = tmp_path / "out"
    proc = start_serve(write_config(tmp_path / "c.yaml", tiny_weights, loops=500), output)
    processes.append(proc)
    wait_for_rows(output, proc, 4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rows = read_focus_log(output / "focus.csv")  # every row complete (flushed per row)
    assert len(rows) >= 4
    stores = open_stores(output)  # metadata was on disk from the start
    assert stores["raw"]["0"].shape == stores["refocused"]["0"].shape == (500, 128, 128)
    # at most the frames in flight are lost: the raw frames logged as seen are (nearly all) on disk
    assert raw_planes(output) >= len(rows) - 2
    record = json.loads((output / "run.json").read_text())
    assert record["state"] == "running"  # written at the start: the record says the run never finished


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("focus: {mode: sometimes}\n", "focus.mode"),
        ("pipeline: {queue_size: 0}\n", "pipeline.queue_size"),
        ("acquisition: {backend: simulator}\npublishing: {pub_adress: x}\n", "unknown key"),
        (": : not yaml\n  - [", "not valid YAML"),
    ],
)
def test_bad_config_is_a_clear_error_with_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "acquire_refocus.cli", "serve", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert expected in proc.stderr and str(config) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_once_without_a_sequence_is_a_clear_error(tmp_path: Path, tiny_weights: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_weights, loops=2)
    data = yaml.safe_load(config.read_text())
    data["acquisition"].pop("sequence")
    config.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "acquire_refocus.cli", "serve", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "acquisition.sequence" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("what", ["a-file", "a-previous-run"])
def test_once_into_an_unusable_output_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, tiny_weights: Path, what: str
) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_weights, loops=2)
    if what == "a-file":
        output = tmp_path / "notes.txt"
        output.write_text("mine")
        expected = "is a file, not a folder"
    else:
        output = tmp_path / "run1"
        (output / "raw.ome.zarr").mkdir(parents=True)
        (output / "raw.ome.zarr" / "data").write_text("raw frames")
        expected = "already holds a run"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run(
        serve_once_command(config, output),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
