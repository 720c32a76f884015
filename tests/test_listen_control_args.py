"""`acquire-refocus listen` and the control commands (status, pause, resume, run, stop) given arguments they
cannot use: one clear message and exit 2, never a traceback, a hang or a flood of output. No daemon runs here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from support import free_tcp_address

from acquire_refocus.cli import main
from acquire_refocus.client import Subscriber
from acquire_refocus.control import DaemonUnavailable, request
from acquire_refocus.errors import UserError

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("restore_logging")]

CONTROL_COMMANDS = [["status"], ["pause"], ["resume"], ["stop"], ["run", "sequence.yaml"]]
BAD_WAITS = ["nan", "inf", "-inf", "0", "-1", "1e10"]  # 1e10 s is more milliseconds than ZeroMQ can take


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, after checking it exited 2."""
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", CONTROL_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("value", BAD_WAITS)
def test_control_timeout_must_be_finite_and_positive(
    command: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = error_of([*command, "--address", free_tcp_address(), f"--timeout={value}"], capsys)
    assert f"acquire-refocus {command[0]}: error: --timeout must be a positive number of seconds" in err


@pytest.mark.parametrize("option", ["--every", "--timeout"])
@pytest.mark.parametrize("value", BAD_WAITS)
def test_listen_waits_must_be_finite_and_positive(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the other wait is short and valid, so that a bad value that is let through ends the test quickly
    other = "--timeout=0.2" if option == "--every" else "--every=0.2"
    err = error_of(["listen", "--address", free_tcp_address(), other, f"{option}={value}"], capsys)
    assert f"acquire-refocus listen: error: {option} must be a positive number of seconds" in err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_listen_count_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(["listen", "--address", free_tcp_address(), "--timeout=0.2", f"--count={value}"], capsys)
    assert f"--count must be a positive number of messages, got {value}" in err


@pytest.mark.parametrize("address", ["notanaddress", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "tcp://*:5556"])
@pytest.mark.parametrize("command", [["listen"], ["status"], ["run", "sequence.yaml"]], ids=lambda c: c[0])
def test_a_malformed_address_is_named_with_the_expected_form(
    command: list[str],
    address: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("sequence.yaml").write_text("time_plan: {interval: 0, loops: 1}\n", encoding="utf-8")
    err = error_of([*command, "--address", address, "--timeout=0.2"], capsys)
    assert f"invalid address {address!r}" in err
    assert "expected one like tcp://127.0.0.1:5556" in err
    assert "no acquire-refocus daemon answered" not in err


def test_a_wellformed_address_with_no_daemon_still_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    address = free_tcp_address()
    assert main(["status", "--address", address, "--timeout=0.2"]) == 1
    assert f"no acquire-refocus daemon answered on {address}" in capsys.readouterr().err
    assert main(["listen", "--address", address, "--timeout=0.2"]) == 1
    assert "nothing received for 0.2 s" in capsys.readouterr().err


def test_the_library_raises_user_error_for_a_malformed_address() -> None:
    with pytest.raises(UserError, match="invalid address 'notanaddress'"):
        Subscriber("notanaddress")
    with pytest.raises(UserError, match="invalid address 'notanaddress'") as caught:
        request("notanaddress", "status", timeout_s=0.2)
    assert not isinstance(caught.value, DaemonUnavailable)  # a typo to fix, not a daemon that is down


def test_run_with_a_binary_file_says_it_is_not_yaml_or_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "frame.tif"
    tifffile.imwrite(image, np.full((16, 16), 65535, dtype=np.uint16))  # 0xff bytes: not UTF-8
    err = error_of(["run", str(image), "--address", free_tcp_address(), "--timeout=0.2"], capsys)
    assert f"acquire-refocus run: error: {image}: not a YAML/JSON text file" in err


def test_run_with_an_unreadable_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sequence = tmp_path / "sequence.yaml"
    sequence.write_text("time_plan: {interval: 0, loops: 1}\n", encoding="utf-8")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # chmod does not stop root, which CI may run as
    err = error_of(["run", str(sequence), "--address", free_tcp_address(), "--timeout=0.2"], capsys)
    assert f"acquire-refocus run: error: {sequence}: cannot read it: Permission denied" in err
