"""A daemon only its key holders can drive or watch (issue 17, part 2): CURVE on both sockets when
publishing.keys_dir is set. Real daemon, real sockets on loopback, keys made by the real `keys` command."""

from __future__ import annotations

import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SEQUENCE, daemon_config

from acquire_refocus.cli import main as cli_main
from acquire_refocus.client import Subscriber
from acquire_refocus.control import DaemonUnavailable, request
from acquire_refocus.daemon import Daemon
from acquire_refocus.errors import UserError
from acquire_refocus.security import generate_keys

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "daemon-keys"
    assert cli_main(["keys", str(folder)]) == 0
    return folder


def client_folder(keys: Path, where: Path) -> Path:
    """What a viewer PC gets: the daemon's public key and its own key pair."""
    where.mkdir(mode=0o700)
    for name in ("server.key", "client.key", "client.key_secret"):
        shutil.copy2(keys / name, where / name)
    return where


@pytest.fixture(scope="module")
def secured(
    keys: Path, tmp_path_factory: pytest.TempPathFactory, tiny_refocuser: Any, tiny_weights: Path
) -> Iterator[Daemon]:
    config = daemon_config(tiny_weights, publishing={"keys_dir": str(keys)})
    daemon = Daemon(config, output_dir=tmp_path_factory.mktemp("out"), corrector=tiny_refocuser)
    server = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    server.start()
    yield daemon
    daemon.request_stop("test cleanup")
    server.join(60)
    daemon.close()


def test_keys_are_private_to_their_owner_and_never_replaced(keys: Path) -> None:
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600
    assert (keys / "clients" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    before = (keys / "server.key_secret").read_bytes()
    with pytest.raises(UserError, match="exists already; keys are never replaced"):
        generate_keys(keys)
    assert (keys / "server.key_secret").read_bytes() == before


def test_control_answers_only_clients_with_an_authorised_key(secured: Daemon, keys: Path, tmp_path: Path) -> None:
    address = secured.config.publishing.control_address
    with pytest.raises(DaemonUnavailable, match="pass --keys DIR"):
        request(address, "stop", timeout_s=1.0)  # no keys: the handshake fails, nothing reaches the daemon
    stranger = tmp_path / "stranger"
    generate_keys(stranger)  # a valid key pair the daemon never authorised
    shutil.copy2(keys / "server.key", stranger / "server.key")
    with pytest.raises(DaemonUnavailable):
        request(address, "stop", timeout_s=1.0, keys_dir=stranger)
    status = request(address, "status", keys_dir=client_folder(keys, tmp_path / "viewer"))
    assert status["ok"] and status["security"] == "curve" and status["state"] == "idle"


def test_frames_reach_only_subscribers_with_an_authorised_key(secured: Daemon, keys: Path, tmp_path: Path) -> None:
    viewer = client_folder(keys, tmp_path / "viewer")
    with (
        Subscriber(secured.config.publishing.pub_address, timeout_s=20.0, keys_dir=viewer) as allowed,
        Subscriber(secured.config.publishing.pub_address, timeout_s=2.0) as anonymous,
    ):
        reply = request(secured.config.publishing.control_address, "run", sequence=SEQUENCE, keys_dir=viewer)
        assert reply["ok"]
        got = [allowed.receive() for _ in range(3)]
        assert all(message is not None for message in got)
        assert anonymous.receive() is None and anonymous.received == 0


def test_the_cli_takes_the_keys(
    secured: Daemon, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = secured.config.publishing.control_address
    assert cli_main(["status", "--address", address, "--timeout", "1"]) == 1
    assert "pass --keys DIR" in capsys.readouterr().err
    assert cli_main(["status", "--address", address, "--keys", str(client_folder(keys, tmp_path / "v"))]) == 0
    assert "state" in capsys.readouterr().out


def test_a_secret_key_others_can_read_is_refused(keys: Path, tmp_path: Path) -> None:
    viewer = client_folder(keys, tmp_path / "viewer")
    (viewer / "client.key_secret").chmod(0o644)
    with pytest.raises(UserError, match="readable by other users is not used; 'chmod 600"):
        Subscriber("tcp://127.0.0.1:5556", keys_dir=viewer)
