"""Reprocessing on an external Dask cluster started with Dask's own command-line tools, a worker killed with SIGKILL
mid-run, and an interrupted run resumed with the same command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import reprocess_data as data
import zarr
from support import free_tcp_address

from acquire_refocus.cli import main

pytestmark = pytest.mark.usefixtures("restore_logging")

DASK = Path(sys.executable).parent / "dask"
LARGE_PX = 256  # frames large enough that a run lasts seconds, so a kill lands in its middle


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group this test started (a worker's nanny and its worker), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def dask_cli_cluster() -> Iterator[str]:
    """`dask scheduler` and `dask worker --nworkers 2 --nthreads 1` on loopback, as subprocesses."""
    from distributed import Client

    address = free_tcp_address()
    port = address.rsplit(":", 1)[1]
    scheduler = subprocess.Popen(
        [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    worker = subprocess.Popen(
        [str(DASK), "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        _stop(worker)
        _stop(scheduler)


def _command(dataset: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "correct",
        str(dataset),
        "--out",
        str(out),
        "--weights",
        str(weights),
        "--engine",
        "torch",
        "--batch-frames",
        "2",
        *extra,
    ]


def _parts(out: Path) -> int:
    folder = out / ".parts"
    return sum(1 for name in os.listdir(folder) if name.endswith(".parquet")) if folder.is_dir() else 0


def _wait_for_parts(out: Path, count: int, process: subprocess.Popen[bytes], timeout_s: float = 240) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if (done := _parts(out)) >= count:
            return done
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before {count} batches were done (exit {process.poll()})")


def _rows_by_frame(out: Path) -> dict[tuple[int, ...], dict[str, Any]]:
    rows = pq.read_table(out / "focus.parquet").to_pylist()
    keyed = {(r["t"], r["p"], r["c"], r["z"]): r for r in rows}
    assert len(keyed) == len(rows), "a frame has more than one row"
    return keyed


def test_external_scheduler_started_with_dask_cli(
    dask_cli_cluster: str, tmp_path: Path, tiny_weights: Path, tiny_refocuser: Any
) -> None:
    source = data.frames_tpcz(1, 2, 1, 3)
    dataset = tmp_path / "raw.ome.zarr"
    data.write_ome_writers(dataset, source)

    assert main(_command(dataset, tmp_path / "out", tiny_weights, "--scheduler", dask_cli_cluster, "--no-images")) == 0

    assert not (tmp_path / "out" / "refocused.ome.zarr").exists()
    rows = _rows_by_frame(tmp_path / "out")
    assert len(rows) == 6
    for (t, p, c, z), row in rows.items():
        expected = tiny_refocuser(source[t, p, c, z], pixel_size_um=data.PIXEL_SIZE_UM)
        assert row["defocus_um"] == pytest.approx(expected.defocus_um, abs=1e-4)


def test_a_worker_killed_mid_run_does_not_fail_the_run(
    dask_cli_cluster: str, tmp_path: Path, tiny_weights: Path, tiny_refocuser: Any
) -> None:
    from distributed import Client

    source = data.frames_tpcz(20, 2, 1, 2, px=LARGE_PX)
    dataset = tmp_path / "raw.ome.zarr"
    data.write_ome_writers(dataset, source)
    out = tmp_path / "out"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "acquire_refocus.cli",
            *_command(dataset, out, tiny_weights, "--scheduler", dask_cli_cluster),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        done_at_kill = _wait_for_parts(out, 3, run)
        with Client(dask_cli_cluster, timeout="30s") as client:
            victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()

    assert run.returncode == 0, stderr.decode()
    assert done_at_kill < 40  # 40 batches of 2 frames: the kill came before the end
    rows = _rows_by_frame(out)
    assert sorted(rows) == [(t, p, 0, z) for t in range(20) for p in range(2) for z in range(2)]
    assert {r["status"] for r in rows.values()} == {"refocused"}
    for (t, p, c, z), row in list(rows.items())[::7]:
        expected = tiny_refocuser(source[t, p, c, z], pixel_size_um=data.PIXEL_SIZE_UM)
        assert row["defocus_um"] == pytest.approx(expected.defocus_um, abs=1e-4)
        plane = zarr.open_array(str(out / "refocused.ome.zarr"), mode="r", path=f"{p}/0")[t, c, z]
        np.testing.assert_allclose(plane, expected.image, rtol=1e-4, atol=1e-2)


def test_an_interrupted_run_resumed_computes_only_the_rest(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    time_points = 12  # batches of 2 frames
    source = data.frames_tpcz(time_points, 1, 1, 2, px=LARGE_PX)
    dataset = tmp_path / "raw.ome.zarr"
    data.write_ome_writers(dataset, source)
    out = tmp_path / "out"
    command = _command(dataset, out, tiny_weights, "--workers", "1")
    # Ctrl-C at a terminal. A test run started in the background (`bash .ci/run &` in a script) inherits SIGINT
    # ignored, and a Python started so never turns SIGINT into KeyboardInterrupt: restore the terminal's default.
    run = subprocess.Popen(
        [sys.executable, "-m", "acquire_refocus.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for_parts(out, 3, run)
        run.send_signal(signal.SIGINT)  # Ctrl-C
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, f"exit {run.returncode} after {_parts(out)} of {time_points} batches"
    assert not (out / "focus.parquet").exists()
    done_before = _parts(out)
    assert 3 <= done_before < time_points

    assert main(command) == 0

    printed = capsys.readouterr().out
    match = re.search(r"computed (\d+) now, (\d+) done by an earlier run", printed)
    assert match, printed
    assert (int(match[1]), int(match[2])) == (2 * (time_points - done_before), 2 * done_before)
    assert main(command) == 0 and "nothing to do" in capsys.readouterr().out
    assert main([*command[:3], str(tmp_path / "straight"), *command[4:]]) == 0
    resumed = pq.read_table(out / "focus.parquet")
    straight = pq.read_table(tmp_path / "straight" / "focus.parquet")
    assert resumed.equals(straight)
    np.testing.assert_array_equal(
        zarr.open_array(str(out / "refocused.ome.zarr"), mode="r", path="0")[...],
        zarr.open_array(str(tmp_path / "straight" / "refocused.ome.zarr"), mode="r", path="0")[...],
    )
