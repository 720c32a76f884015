"""The daemon's rotating log file: real `acquire-refocus serve` processes on the simulated microscope."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import serve_once_command, write_serve_config

from acquire_refocus.config import LogFileConfig
from acquire_refocus.errors import UserError
from acquire_refocus.logs import LOG_FILE_NAME, log_file

pytestmark = pytest.mark.timeout(240)

# the stderr format: time, level, logger, then the event's key=value pairs
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} level=[A-Z]+ logger=acquire_refocus\S* event=\w+( |$)")


def _config(path: Path, weights: Path, log_settings: dict[str, Any]) -> Path:
    return write_serve_config(
        path,
        weights,
        {"time_plan": {"interval": 0, "loops": 4}, "stage_positions": [{"x": 0, "y": 0, "z": 100}]},
        log_file=log_settings,
    )


def _serve(config: Path, output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_once_command(config, output),
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )


def _log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " level=" in line]


def test_serve_writes_a_rotating_log_file_beside_its_output(tmp_path: Path, tiny_weights: Path) -> None:
    max_bytes = 1500
    config = _config(tmp_path / "c.yaml", tiny_weights, {"max_file_mb": max_bytes / 2**20, "keep_files": 2})
    output = tmp_path / "run"
    done = _serve(config, output)
    assert done.returncode == 0, done.stderr[-3000:]

    files = sorted(p.name for p in output.glob(f"{LOG_FILE_NAME}*"))
    assert files == [LOG_FILE_NAME, f"{LOG_FILE_NAME}.1", f"{LOG_FILE_NAME}.2"]  # rotated, the oldest deleted
    stderr_lines = _log_lines(done.stderr)
    current = (output / LOG_FILE_NAME).read_text(encoding="utf-8").splitlines()
    assert current[-1] == stderr_lines[-1] and "event=" in current[-1]
    for name in files:
        lines = (output / name).read_text(encoding="utf-8").splitlines()
        assert lines and all(LINE.match(line) for line in lines), lines
        assert set(lines) <= set(stderr_lines)  # the same lines as stderr, in the same format
        assert (output / name).stat().st_size <= max_bytes or len(lines) == 1  # only a single long line exceeds it
    kept = [line for name in reversed(files) for line in (output / name).read_text(encoding="utf-8").splitlines()]
    assert kept == stderr_lines[-len(kept) :]  # the newest lines, in order, none lost between the files
    assert any("event=run_done" in line for line in kept)


def test_log_file_in_a_configured_folder_keeps_every_start_and_the_error(tmp_path: Path, tiny_weights: Path) -> None:
    logs = tmp_path / "logs"
    config = _config(tmp_path / "c.yaml", tiny_weights, {"folder": str(logs)})
    assert _serve(config, tmp_path / "run1").returncode == 0
    host, port = yaml.safe_load(config.read_text(encoding="utf-8"))["publishing"]["pub_address"][6:].split(":")
    with socket.socket() as taken:  # another program holds the publishing port: the daemon cannot start
        taken.bind((host, int(port)))
        taken.listen()
        again = _serve(config, tmp_path / "run2")
    assert again.returncode == 2 and "cannot open the" in again.stderr and "Traceback" not in again.stderr

    assert not list(tmp_path.glob(f"run*/{LOG_FILE_NAME}"))
    lines = (logs / LOG_FILE_NAME).read_text(encoding="utf-8").splitlines()
    assert sum("event=log_file " in line for line in lines) == 2  # appended across restarts
    assert "event=run_done" in "\n".join(lines)
    assert "level=ERROR" in lines[-1] and "event=stopped" in lines[-1] and "cannot open the" in lines[-1]


def test_a_previous_run_folder_is_refused_before_the_log_file_is_written(tmp_path: Path, tiny_weights: Path) -> None:
    config = _config(tmp_path / "c.yaml", tiny_weights, {})
    output = tmp_path / "run"
    assert _serve(config, output).returncode == 0
    before = (output / LOG_FILE_NAME).read_bytes()
    again = _serve(config, output)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (output / LOG_FILE_NAME).read_bytes() == before  # a previous run's folder is left as it was


def test_no_log_file_when_off_or_without_a_folder(tmp_path: Path) -> None:
    with log_file(LogFileConfig(enabled=False), tmp_path) as path:
        assert path is None
    with log_file(LogFileConfig(), None) as path:
        assert path is None
    assert not list(tmp_path.iterdir())


def test_a_log_folder_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    with (
        pytest.raises(UserError, match=r"log_file.folder .*not-a-folder: is a file, not a folder"),
        log_file(LogFileConfig(folder=blocker), None),
    ):
        pass
