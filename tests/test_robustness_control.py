"""The control socket under requests a user or an adversary could send (issue 17, part 2): every one is answered
with `ok: false` and a reason, before any work, and the daemon keeps answering. Real daemon on the simulated
microscope, real REQ/REP sockets on loopback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from support import SEQUENCE, daemon_config, free_tcp_address, serve_once_command

from acquire_refocus.control import MAX_REQUEST_BYTES, ControlServer, request
from acquire_refocus.daemon import Daemon

pytestmark = pytest.mark.timeout(180)


def raw_request(address: str, payload: bytes, timeout_s: float = 10.0) -> dict[str, Any]:
    """Send bytes as they are (not necessarily JSON) and return the JSON reply."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    socket.connect(address)
    try:
        socket.send(payload)
        reply: dict[str, Any] = json.loads(socket.recv())
        return reply
    finally:
        socket.close(linger=0)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_refocuser: Any, tiny_weights: Path) -> Iterator[Daemon]:
    """One daemon waiting for runs, paused so that an accepted run never starts acquiring during these tests."""
    root = tmp_path_factory.mktemp("data-root")
    daemon = Daemon(daemon_config(tiny_weights), output_dir=root, corrector=tiny_refocuser)
    server = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    server.start()
    address = daemon.config.publishing.control_address
    assert request(address, "status", timeout_s=60)["ok"]  # the core is loaded before the first request
    yield daemon
    daemon.request_stop("test cleanup")
    server.join(60)
    daemon.close()


def assert_still_answers(daemon: Daemon) -> None:
    status = request(daemon.config.publishing.control_address, "status")
    assert status["ok"] is True and status["runs_queued"] == 0


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"[" * 1000, "nested 1000 levels deep"),
        (b'{"command": "status", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested 100001 levels deep"),
        (b'{"command": "run", "sequence": {"metadata": {"x": "' + b"a" * MAX_REQUEST_BYTES + b'"}}}', "larger than"),
        (b"\xff\xfe", "not JSON"),
        (b'"status"', "expected a JSON object"),
        (b'{"command": "status", "extra": 1}', "takes no field(s) 'extra'"),
        (b'{"command": "format-disk"}', "unknown command 'format-disk'"),
    ],
    ids=["brackets", "deep-field", "oversized", "not-utf8", "not-object", "unknown-field", "unknown-command"],
)
def test_malformed_requests_are_refused_and_the_daemon_answers_on(
    serving: Daemon, payload: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply = raw_request(serving.config.publishing.control_address, payload)
    assert reply["ok"] is False and error in reply["error"]
    assert_still_answers(serving)
    assert not [r for r in caplog.records if r.exc_info]  # a refusal, not a traceback in the log


@pytest.mark.parametrize(
    ("time_plan", "events"),
    [
        ({"interval": 0, "loops": 100_000_000}, "100,000,000 events"),
        ({"interval": 0, "loops": 10**12}, "1,000,000,000,000 events"),
        ({"interval": 0.001, "duration": 10**9}, "1,000,000,000,001 events"),
    ],
    ids=["1e8-loops", "1e12-loops", "duration"],
)
def test_a_sequence_over_the_event_limit_is_refused_without_listing_it(
    serving: Daemon, time_plan: dict[str, Any], events: str
) -> None:
    reply = request(serving.config.publishing.control_address, "run", sequence={"time_plan": time_plan})
    assert reply["ok"] is False and events in reply["error"] and "more than one run takes" in reply["error"]
    assert_still_answers(serving)


@pytest.mark.parametrize(
    ("output", "error"),
    [
        (12345, '"output" must be a folder path'),
        (["a"], '"output" must be a folder path'),
        ("a\0b", '"output" must be a folder path'),
        ("", '"output" must be a folder path'),
        ("../../x", "outside the daemon's data root"),
        ("inside/../../escaped", "outside the daemon's data root"),
        ("/etc", "outside the daemon's data root"),
    ],
    ids=["number", "list", "nul", "empty", "dotdot", "dotdot-inside", "etc"],
)
def test_run_outputs_outside_the_data_root_or_of_the_wrong_type_are_refused(
    serving: Daemon, output: Any, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert serving.data_root is not None
    before = sorted(p.name for p in serving.data_root.parent.iterdir())
    reply = request(serving.config.publishing.control_address, "run", sequence=SEQUENCE, output=output)
    assert reply["ok"] is False and error in reply["error"]
    assert sorted(p.name for p in serving.data_root.parent.iterdir()) == before  # nothing created beside the root
    assert not [r for r in caplog.records if r.exc_info]
    assert_still_answers(serving)


def test_a_symlink_out_of_the_data_root_is_refused(serving: Daemon, tmp_path: Path) -> None:
    assert serving.data_root is not None
    link = serving.data_root / "elsewhere"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        reply = request(serving.config.publishing.control_address, "run", sequence=SEQUENCE, output=str(link / "run"))
        assert reply["ok"] is False and "outside the daemon's data root" in reply["error"]
        assert list(tmp_path.iterdir()) == []
    finally:
        link.unlink()


def test_a_sequence_sent_as_text_or_with_wrong_types_is_refused(serving: Daemon) -> None:
    address = serving.config.publishing.control_address
    as_text = request(address, "run", sequence="time_plan: {interval: 0, loops: 2}")
    assert as_text["ok"] is False and '"sequence" must be a useq-schema MDASequence object' in as_text["error"]
    bad_type = request(address, "run", sequence={"time_plan": {"interval": 0, "loops": "many"}})
    assert bad_type["ok"] is False and "time_plan" in bad_type["error"]
    assert_still_answers(serving)


def test_a_channel_the_hardware_lacks_is_refused_in_the_reply(serving: Daemon) -> None:
    assert serving.data_root is not None
    sequence = {"time_plan": {"interval": 0, "loops": 2}, "channels": [{"group": "Channel", "config": "DAPPI"}]}
    reply = request(serving.config.publishing.control_address, "run", sequence=sequence, output="typo-run")
    assert reply["ok"] is False and "group 'Channel' is not in the hardware configuration" in reply["error"]
    assert not (serving.data_root / "typo-run").exists()  # no empty folder left behind
    assert_still_answers(serving)


def test_a_run_inside_the_data_root_is_accepted(serving: Daemon) -> None:
    assert serving.data_root is not None
    address = serving.config.publishing.control_address
    request(address, "pause")
    reply = request(address, "run", sequence=SEQUENCE, output="sub/../accepted")
    assert reply["ok"] is True and Path(reply["output_dir"]) == serving.data_root / "accepted"


def test_a_config_sequence_of_1e12_loops_is_refused_at_once(tmp_path: Path, tiny_weights: Path) -> None:
    config = tmp_path / "huge.yaml"
    config.write_text(
        f"model: {{weights: {tiny_weights}}}\nengine: {{backend: torch}}\n"
        "acquisition:\n  sequence: {time_plan: {interval: 0, loops: 1000000000000}}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        serve_once_command(config, tmp_path / "out"),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert "1,000,000,000,000 events" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_control_thread_survives_a_handler_that_raises_anything() -> None:
    """A handler bug (here: one that recurses without end) is an ok: false reply, not a dead thread: the daemon's
    control server, on a real socket, with a broken handler beside a working one."""

    def recurse(request: dict[str, Any]) -> dict[str, Any]:
        return recurse(request)

    def status(request: dict[str, Any]) -> dict[str, Any]:
        return {"runs_queued": 0}

    server = ControlServer(free_tcp_address(), {"recurse": recurse, "status": status}).start()
    logging.getLogger("acquire_refocus.control").disabled = True
    try:
        reply = request(server.address, "recurse")
        assert reply["ok"] is False and "RecursionError" in reply["error"]
        assert request(server.address, "status") == {"ok": True, "runs_queued": 0}
    finally:
        logging.getLogger("acquire_refocus.control").disabled = False
        server.close()
