"""Publish raw frames, refocused frames and focus estimates over ZeroMQ (PUB), never waiting for a subscriber.

Messages are multipart: `[topic, header, pixels]` for the topics `raw` and `refocused`, `[topic, header]` for
`focus`. The header is UTF-8 JSON (see `frame_header`); the pixels are the frame's C-ordered buffer, handed to
ZeroMQ without a copy. A PUB socket never blocks: a subscriber that falls `high_water_mark` messages behind
loses messages (ZeroMQ drops them for that subscriber alone), which it can see as gaps in the running `frame`
index (`client.Subscriber.missed`). The socket is used by one thread only: the pipeline's dispatch thread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from acquire_refocus.config import PublishingConfig
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.pipeline import FocusOffsetLookup, FrameResult

log = logging.getLogger(__name__)

TOPIC_RAW = b"raw"
TOPIC_REFOCUSED = b"refocused"
TOPIC_FOCUS = b"focus"
TOPICS = ("raw", "refocused", "focus")


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def frame_header(
    result: FrameResult, topic: str, pixels: np.ndarray | None, run: str = "", focus_offset_um: float | None = None
) -> dict[str, Any]:
    """The JSON header of one message. Non-finite numbers become null."""
    info = result.info
    shown = pixels if pixels is not None else result.raw  # focus messages describe the raw frame
    header: dict[str, Any] = {
        "topic": topic,
        "run": run,
        "frame": result.frame,
        "axes": dict(info.axes),
        "shape": list(shown.shape) if shown is not None else None,
        "dtype": str(shown.dtype) if shown is not None else None,
        "stage_z_um": _finite_or_none(info.stage_z_um),
        "stage_xy_um": list(info.stage_xy_um) if info.stage_xy_um is not None else None,
        "pixel_size_um": _finite_or_none(info.pixel_size_um),
        "defocus_um": _finite_or_none(result.defocus_um),
        "confidence": _finite_or_none(result.confidence),
        "defocus_magnitude_um": _finite_or_none(result.defocus_magnitude_um),
        "focus_offset_um": _finite_or_none(focus_offset_um),
        "refocused": result.refocused,
        "status": result.status,
        "t_acquired": info.t_acquired,
        "latency_ms": round(result.latency_ms, 3),
        "engine": result.engine,
    }
    if result.reason:
        header["reason"] = result.reason
    if result.flags:
        header["flags"] = list(result.flags)
    return header


def bind_socket(
    context: zmq.Context[zmq.Socket[bytes]],
    kind: int,
    address: str,
    what: str,
    options: dict[int, int | bytes] | None = None,
) -> zmq.Socket[bytes]:
    """Bind a socket (options set first: ZeroMQ applies them to connections made after), turning an unusable
    address into a clear UserError."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    for option, value in (options or {}).items():
        socket.setsockopt(option, value)
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        socket.close(linger=0)
        in_use = exc.errno == zmq.EADDRINUSE
        hint = " (is another daemon running? choose another port in publishing.*_address)" if in_use else ""
        raise UserError(f"cannot open the {what} socket on {address}: {exc}{hint}") from None
    return socket


@dataclass(frozen=True)
class PublisherStats:
    published: int  # messages handed to ZeroMQ
    dropped: int  # messages ZeroMQ refused (would have blocked) or that failed to send
    bytes_published: int
    address: str


class Publisher:
    """Owns the PUB socket. Bind in the constructor (so a bad address fails at start-up), then send only from
    one thread at a time; the daemon hands it from run to run (a thread join is the memory barrier ZeroMQ asks
    for when a socket changes threads)."""

    def __init__(
        self,
        config: PublishingConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        security: dict[int, int | bytes] | None = None,
    ) -> None:
        """`security`: socket options of a CURVE server (`security.SecureContext`), None for none."""
        self._config = config
        self._context = context or zmq.Context.instance()
        self._socket = bind_socket(
            self._context,
            zmq.PUB,
            config.pub_address,
            "publishing",
            {zmq.SNDHWM: config.high_water_mark, **(security or {})},
        )
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()  # counters only; sends happen in one thread
        self._published = 0
        self._dropped = 0
        self._bytes = 0
        self.run = ""
        log.info(
            kv(
                "publisher_bound",
                address=self.address,
                high_water_mark=config.high_water_mark,
                publish_raw=config.publish_raw,
                security="curve" if security else "off",
            )
        )

    def publish(self, result: FrameResult, focus_offset_um: float | None = None) -> None:
        """Send raw (when configured), refocused (when there is one) and focus messages for one result;
        `focus_offset_um`: the focus loop's Z offset for its frame, when there is a loop."""
        raw = result.raw
        if self._config.publish_raw and isinstance(raw, np.ndarray) and raw.dtype.kind in "uif":
            self._send(TOPIC_RAW, result, np.ascontiguousarray(raw), focus_offset_um)
        if result.image is not None:
            self._send(TOPIC_REFOCUSED, result, np.ascontiguousarray(result.image), focus_offset_um)
        self._send(TOPIC_FOCUS, result, None, focus_offset_um)

    def _send(
        self, topic: bytes, result: FrameResult, pixels: np.ndarray | None, focus_offset_um: float | None
    ) -> None:
        header = json.dumps(frame_header(result, topic.decode(), pixels, self.run, focus_offset_um)).encode()
        parts: list[Any] = [topic, header] if pixels is None else [topic, header, pixels]
        try:
            # copy=False: ZeroMQ keeps a reference to the array's buffer instead of copying the pixels.
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            with self._lock:
                self._dropped += 1
            return
        except zmq.ZMQError as exc:
            with self._lock:
                self._dropped += 1
            log.error(kv("publish_failed", topic=topic.decode(), frame=result.frame, error=str(exc)))
            return
        with self._lock:
            self._published += 1
            self._bytes += len(header) + (pixels.nbytes if pixels is not None else 0)

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(self._published, self._dropped, self._bytes, self.address)

    def close(self) -> None:
        self._socket.close(linger=0)
        log.info(kv("publisher_closed", published=self._published, dropped=self._dropped))


class PublishSink:
    """FrameSink adapter: publishes every result; closing it leaves the Publisher open for the next run."""

    def __init__(self, publisher: Publisher, focus_offset: FocusOffsetLookup | None = None) -> None:
        self.publisher = publisher
        self._focus_offset = focus_offset

    def on_frame(self, result: FrameResult) -> None:
        offset_um = self._focus_offset(result.info.axes) if self._focus_offset is not None else None
        self.publisher.publish(result, offset_um)

    def close(self) -> None:
        """The socket outlives a run; the daemon closes the Publisher itself."""
