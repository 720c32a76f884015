"""The daemon's control socket (ZeroMQ REP, JSON): status, pause, resume, run, stop.

Request: `{"command": "status"}` (plus `"sequence": {...}` for run). Reply: `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. The server runs in its own thread and owns its socket; handlers must be quick
(they only read counters or set flags), so a client never waits long.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from acquire_refocus.client import connect
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.publishing import bind_socket
from acquire_refocus.security import apply_options, client_options

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "run", "stop")
Handler = Callable[[dict[str, Any]], dict[str, Any]]

# A run request is a few KB (a sequence with hundreds of positions stays well under this); anything bigger or
# deeper is refused before it is parsed: json.loads recurses once per level (RecursionError near 1,000) and
# holds the whole document in memory.
MAX_REQUEST_BYTES = 256 * 1024
MAX_REQUEST_DEPTH = 32
# What ZeroMQ itself accepts on the control socket: a peer sending more is disconnected before the bytes are held.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Fields each command takes besides "command"; any other is a typo or a request for another program.
REQUEST_FIELDS: dict[str, frozenset[str]] = {"run": frozenset({"sequence", "output"})}
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text, without parsing it (strings removed first, then a
    running count of brackets, vectorised: a 256 KB request takes about a millisecond)."""
    structure = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(structure, (ord("["), ord("{"))).astype(np.int64) - np.isin(structure, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def check_request(raw: bytes) -> dict[str, Any]:
    """The request as a dict, after its size, nesting, JSON, command and field names were checked; UserError
    with the reason otherwise."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise UserError(f"request of {len(raw):,} bytes is larger than the {MAX_REQUEST_BYTES:,} a command takes")
    depth = json_depth(raw)
    if depth > MAX_REQUEST_DEPTH:
        raise UserError(f"request nested {depth} levels deep; a command takes at most {MAX_REQUEST_DEPTH}")
    try:
        request = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise UserError('expected a JSON object like {"command": "status"}')
    extra = sorted(set(request) - {"command"} - REQUEST_FIELDS.get(request["command"], frozenset()))
    if extra:
        raise UserError(f"command {request['command'][:40]!r} takes no field(s) {', '.join(map(repr, extra))[:200]}")
    return request


class DaemonUnavailable(UserError):  # noqa: N818 - public name (client API), kept
    """No daemon answered on the control address in time."""


class ControlServer:
    """REP socket answering JSON requests with the given handlers, in a background thread."""

    def __init__(
        self,
        address: str,
        handlers: dict[str, Handler],
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        security: dict[int, int | bytes] | None = None,
    ) -> None:
        """`security`: socket options of a CURVE server (`security.SecureContext`), None for none."""
        self._handlers = handlers
        self._security = "curve" if security else "off"
        self._socket = bind_socket(
            context or zmq.Context.instance(),
            zmq.REP,
            address,
            "control",
            {zmq.MAXMSGSIZE: MAX_MESSAGE_BYTES, **(security or {})},
        )
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="refocus-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        log.info(
            kv("control_listening", address=self.address, commands=",".join(self._handlers), security=self._security)
        )
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        else:
            self._socket.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                try:
                    raw = self._socket.recv()
                except zmq.ZMQError:
                    continue
                try:
                    reply = self._handle(raw)
                except BaseException as exc:  # whatever a request does, the thread answers on (logged with its trace)
                    log.exception(kv("control_request_failed"))
                    reply = {"ok": False, "error": f"request failed: {type(exc).__name__}"}
                try:
                    self._socket.send(json.dumps(reply, default=str).encode())
                except zmq.ZMQError as exc:
                    log.error(kv("control_reply_failed", error=str(exc)))
        finally:
            self._socket.close(linger=0)

    def _handle(self, raw: bytes) -> dict[str, Any]:
        try:
            request = check_request(raw)
        except UserError as exc:
            log.warning(kv("control_request_refused", error=str(exc)[:200]))
            return {"ok": False, "error": str(exc)}
        command = request["command"]
        handler = self._handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command[:40]!r}; known: {', '.join(self._handlers)}"}
        try:
            reply = handler(request)
        except UserError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in a handler must not take the control socket down
            log.exception(kv("control_handler_failed", command=command))
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        log.info(kv("control_command", command=command))
        return {"ok": True, **reply}


def request(
    address: str, command: str, timeout_s: float = 5.0, keys_dir: str | Path | None = None, **fields: Any
) -> dict[str, Any]:
    """Send one command to a daemon and return its reply; DaemonUnavailable when none answers in time, UserError
    when the address is malformed. `keys_dir`: the CURVE keys of a daemon that requires them (security.py)."""
    options = client_options(keys_dir) if keys_dir is not None else None
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
    socket.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    apply_options(socket, options)
    connect(socket, address)
    try:
        socket.send(json.dumps({"command": command, **fields}).encode())
        reply = json.loads(socket.recv().decode("utf-8"))
    except zmq.Again:
        raise DaemonUnavailable(
            f"no acquire-refocus daemon answered on {address} within {timeout_s:g} s "
            "(start one with 'acquire-refocus serve', or pass --address; a daemon with publishing.keys_dir "
            "answers only clients with its keys: pass --keys DIR)"
        ) from None
    except zmq.ZMQError as exc:
        raise DaemonUnavailable(f"cannot reach a daemon on {address}: {exc}") from None
    finally:
        socket.close(linger=0)
    if not isinstance(reply, dict):
        raise DaemonUnavailable(f"{address} answered something that is not an acquire-refocus reply: {reply!r}")
    return reply
