"""Subscribe to a running daemon: `(header, pixels)` for every message, with time-outs.

with Subscriber("tcp://127.0.0.1:5556", topics=("refocused",), timeout_s=5) as sub:
    for header, image in sub:          # ends when nothing arrives for timeout_s
        print(header["frame"], header["defocus_um"], image.shape)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from acquire_refocus.addresses import address_problem
from acquire_refocus.errors import UserError
from acquire_refocus.publishing import TOPICS
from acquire_refocus.security import apply_options, client_options

Message = tuple[dict[str, Any], np.ndarray | None]

MAX_WAIT_S = (2**31 - 1) / 1000  # ZeroMQ takes waits as a C int of milliseconds (about 24.8 days)


def check_wait_s(option: str, value: float) -> None:
    """A wait the user typed must be one ZeroMQ can take: finite, positive, at most MAX_WAIT_S; UserError
    otherwise (nan and inf would fail deep inside ZeroMQ, zero or less would spin or never wait)."""
    if not (math.isfinite(value) and 0 < value <= MAX_WAIT_S):
        raise UserError(f"{option} must be a positive number of seconds, at most {MAX_WAIT_S:g}, got {value}")


def connect(socket: zmq.Socket[bytes], address: str) -> None:
    """Connect `socket` to `address`, closing it and raising UserError when the address is malformed: that is a
    typo to fix, not a daemon that is down. ZeroMQ accepts a TCP port out of range and then never connects, so
    the port is checked here."""
    scheme = address.partition("://")[0]
    problem = address_problem(address, bind=False) if scheme == "tcp" else ""
    if not problem:
        try:
            socket.connect(address)
        except zmq.ZMQError as exc:
            problem = exc.strerror
    if problem:
        socket.close(linger=0)
        raise UserError(f"invalid address {address!r} ({problem}); expected one like tcp://127.0.0.1:5556")


class Subscriber:
    """A SUB socket on the daemon's publishing address.

    Topics: "raw", "refocused", "focus" (default: all). The pixel array is a read-only view of the received
    buffer (no copy). `missed` counts messages lost on the way (gaps in the running frame index of the raw and
    focus topics, which carry every frame), for example when this subscriber fell too far behind.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5556",
        topics: Iterable[str] = TOPICS,
        timeout_s: float | None = 5.0,
        high_water_mark: int = 1000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys_dir: str | Path | None = None,
    ) -> None:
        """`keys_dir`: the CURVE keys of a daemon that requires them (security.py); without them such a daemon
        sends nothing."""
        topics = tuple(topics)
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:
            raise ValueError(f"unknown topic(s) {unknown}; choose from {list(TOPICS)}")
        self.address = address
        self.timeout_s = timeout_s
        security = client_options(keys_dir) if keys_dir is not None else None
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, high_water_mark)
        apply_options(self._socket, security)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        connect(self._socket, address)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._last_frame: dict[str, tuple[str, int]] = {}
        self.received = 0
        self.missed = 0

    def receive(self, timeout_s: float | None = -1.0) -> Message | None:
        """The next message, or None when nothing arrives within timeout_s (-1: the subscriber's default;
        None: wait forever)."""
        wait_s = self.timeout_s if timeout_s == -1.0 else timeout_s
        if not self._poller.poll(None if wait_s is None else max(0, int(wait_s * 1000))):
            return None
        parts = self._socket.recv_multipart(copy=False)
        header = json.loads(bytes(parts[1].buffer))
        pixels = None
        if len(parts) > 2:
            pixels = np.frombuffer(parts[2].buffer, dtype=header["dtype"]).reshape(header["shape"])
        self._count(header)
        return header, pixels

    def _count(self, header: dict[str, Any]) -> None:
        self.received += 1
        topic = header.get("topic", "")
        if topic not in ("raw", "focus"):
            return
        run, frame = header.get("run", ""), int(header["frame"])
        last = self._last_frame.get(topic)
        if last is not None and last[0] == run and frame > last[1] + 1:
            self.missed += frame - last[1] - 1
        self._last_frame[topic] = (run, frame)

    def __iter__(self) -> Iterator[Message]:
        """Messages until none arrives for `timeout_s` (forever when timeout_s is None)."""
        while (message := self.receive()) is not None:
            yield message

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
