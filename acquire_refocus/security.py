"""Who may drive the daemon and read its frames: ZeroMQ's own CURVE security (encryption plus public-key
authentication of clients) on both sockets, whenever `publishing.keys_dir` is set; a socket bound beyond loopback
requires it (config.py).

A keys folder, made by `acquire-refocus keys DIR` (folder 0700, secret keys 0600):

    DIR/server.key          the daemon's public key: every client needs a copy
    DIR/server.key_secret   the daemon's secret key: stays on the scope PC
    DIR/NAME.key_secret     a client's key pair (NAME.key beside it): hand both, with server.key, to that client
    DIR/clients/NAME.key    the public keys of the clients the daemon accepts (read at start: delete one and
                            restart the daemon to lock that client out)

A client (`listen`, `status`, `run`, ..., `client.Subscriber`, `control.request`) given `--keys DIR` uses
DIR/server.key and DIR/client.key_secret, or the one other NAME.key_secret there. Secret key files readable by
others are refused.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from acquire_refocus.errors import UserError

SERVER = "server"
DEFAULT_CLIENT = "client"
CLIENTS_DIR = "clients"

SocketOptions = dict[int, int | bytes]


def generate_keys(folder: str | Path, client: str = DEFAULT_CLIENT) -> list[Path]:
    """Create the daemon's key pair (once) and a client key pair named `client`, authorised at once; the files
    written. Existing keys are never replaced (UserError): a new server key would lock every client out."""
    folder = Path(folder)
    if not client.isidentifier():
        raise UserError(f"--client {client!r}: use letters, digits and _ only (it becomes a file name)")
    if client == SERVER:
        raise UserError(f"--client {SERVER!r}: that name is the daemon's own key")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / CLIENTS_DIR).mkdir(mode=0o700, exist_ok=True)
    written: list[Path] = []
    if not (folder / f"{SERVER}.key_secret").exists():
        written += _create_pair(folder, SERVER)
    if (folder / f"{client}.key_secret").exists():
        raise UserError(
            f"{folder / (client + '.key_secret')}: exists already; keys are never replaced (choose "
            "another --client name, or delete that client's files to revoke it first)"
        )
    written += _create_pair(folder, client)
    authorised = folder / CLIENTS_DIR / f"{client}.key"
    shutil.copyfile(folder / f"{client}.key", authorised)
    written.append(authorised)
    for path in (folder, folder / CLIENTS_DIR):
        path.chmod(0o700)
    return written


def _create_pair(folder: Path, name: str) -> list[Path]:
    public, secret = (Path(p) for p in zmq.auth.create_certificates(folder, name))
    secret.chmod(0o600)
    return [public, secret]


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise UserError(f"{path}: key file not found (create keys with 'acquire-refocus keys DIR')")
    if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{path}: a secret key readable by other users is not used; 'chmod 600 {path}'")
    try:
        public, private = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not a ZeroMQ CURVE key file ({exc})") from None
    if secret and private is None:
        raise UserError(f"{path}: holds no secret key")
    return public, private


def server_options(keys_dir: str | Path) -> SocketOptions:
    """Options that make a bound socket a CURVE server with the daemon's key."""
    public, secret = _load(Path(keys_dir) / f"{SERVER}.key_secret", secret=True)
    assert secret is not None
    return {zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}


def client_options(keys_dir: str | Path) -> SocketOptions:
    """Options that make a connecting socket a CURVE client of the daemon whose public key is in `keys_dir`."""
    folder = Path(keys_dir)
    server_public, _ = _load(folder / f"{SERVER}.key", secret=False)
    public, secret = _load(_client_secret(folder), secret=True)
    assert secret is not None
    return {zmq.CURVE_SERVERKEY: server_public, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}


def _client_secret(folder: Path) -> Path:
    """DIR/client.key_secret, else the only NAME.key_secret of DIR that is not the server's."""
    default = folder / f"{DEFAULT_CLIENT}.key_secret"
    if default.exists():
        return default
    others = sorted(p for p in folder.glob("*.key_secret") if p.name != f"{SERVER}.key_secret")
    if len(others) == 1:
        return others[0]
    found = ", ".join(p.name for p in others) or "none"
    raise UserError(
        f"{folder}: expected one client secret key (client.key_secret, or one NAME.key_secret), "
        f"found {found}; give the client a folder with server.key and its own key pair"
    )


def apply_options(socket: zmq.Socket[bytes], options: SocketOptions | None) -> None:
    for option, value in (options or {}).items():
        socket.setsockopt(option, value)


@dataclass
class SecureContext:
    """A ZeroMQ context of its own whose CURVE servers accept only the clients in `keys_dir/clients` (checked by
    pyzmq's authenticator thread at each connection), and the options for its bound sockets."""

    context: zmq.Context[zmq.Socket[bytes]]
    options: SocketOptions
    _authenticator: ThreadAuthenticator

    @classmethod
    def open(cls, keys_dir: str | Path) -> SecureContext:
        folder = Path(keys_dir)
        options = server_options(folder)
        clients = folder / CLIENTS_DIR
        if not clients.is_dir() or not any(clients.glob("*.key")):
            raise UserError(
                f"{clients}: no client keys, so no client could connect; add one with "
                f"'acquire-refocus keys {folder} --client NAME'"
            )
        context = zmq.Context()
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=os.fspath(clients))
        return cls(context, options, authenticator)

    def close(self) -> None:
        """After every socket of the context is closed."""
        self._authenticator.stop()
        self.context.term()
