"""The daemon's control socket (ZeroMQ REP, JSON): status, pause, resume, run, stop.

Request: `{"command": "status"}` (plus `"sequence": {...}` for run). Reply: `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. The server runs in its own thread and owns its socket; handlers must be quick
(they only read counters or set flags), so a client never waits long.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from acquire_refocus.client import connect
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.publishing import bind_socket

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "run", "stop")
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class DaemonUnavailable(UserError):
    """No daemon answered on the control address in time."""


class ControlServer:
    """REP socket answering JSON requests with the given handlers, in a background thread."""

    def __init__(self, address: str, handlers: dict[str, Handler], context: zmq.Context | None = None) -> None:
        self._handlers = handlers
        self._socket = bind_socket(context or zmq.Context.instance(), zmq.REP, address, "control")
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="refocus-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        log.info(kv("control_listening", address=self.address, commands=",".join(self._handlers)))
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
                reply = self._handle(raw)
                try:
                    self._socket.send(json.dumps(reply, default=str).encode())
                except zmq.ZMQError as exc:
                    log.error(kv("control_reply_failed", error=str(exc)))
        finally:
            self._socket.close(linger=0)

    def _handle(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'expected a JSON object like {"command": "status"}'}
        command = request["command"]
        handler = self._handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}; known: {', '.join(self._handlers)}"}
        try:
            reply = handler(request)
        except UserError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in a handler must not take the control socket down
            log.exception(kv("control_handler_failed", command=command))
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        log.info(kv("control_command", command=command))
        return {"ok": True, **reply}


def request(address: str, command: str, timeout_s: float = 5.0, **fields: Any) -> dict[str, Any]:
    """Send one command to a daemon and return its reply; DaemonUnavailable when none answers in time, UserError
    when the address is malformed."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
    socket.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    connect(socket, address)
    try:
        socket.send(json.dumps({"command": command, **fields}).encode())
        reply = json.loads(socket.recv().decode("utf-8"))
    except zmq.Again:
        raise DaemonUnavailable(
            f"no acquire-refocus daemon answered on {address} within {timeout_s:g} s "
            "(start one with 'acquire-refocus serve', or pass --address)"
        ) from None
    except zmq.ZMQError as exc:
        raise DaemonUnavailable(f"cannot reach a daemon on {address}: {exc}") from None
    finally:
        socket.close(linger=0)
    if not isinstance(reply, dict):
        raise DaemonUnavailable(f"{address} answered something that is not an acquire-refocus reply: {reply!r}")
    return reply
