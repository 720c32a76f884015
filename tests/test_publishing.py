"""ZeroMQ publishing and control on loopback: real sockets, free ports, every socket closed with LINGER 0."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from acquire_refocus.client import Subscriber
from acquire_refocus.config import PublishingConfig
from acquire_refocus.control import ControlServer, DaemonUnavailable, request
from acquire_refocus.errors import UserError
from acquire_refocus.pipeline import FrameInfo, FrameResult
from acquire_refocus.publishing import Publisher

pytestmark = pytest.mark.timeout(60)


def make_result(frame: int, refocused: bool = True, shape: tuple[int, int] = (64, 80)) -> FrameResult:
    raw = np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape) + frame % 100
    return FrameResult(
        frame=frame,
        raw=raw,
        info=FrameInfo({"t": frame, "p": 0}, 101.5, (10.0, -5.0), 1_700_000_000.0 + frame, 0.325),
        status="refocused" if refocused else "skipped",
        image=raw.astype(np.float32) * 0.5 if refocused else None,
        defocus_um=1.25 if refocused else math.nan,
        confidence=0.8 if refocused else math.nan,
        reason="" if refocused else "engine behind: correction queue full",
        engine="torch",
        latency_ms=12.5,
    )


def connected_pair(address: str, hwm: int = 64, **subscriber: object) -> tuple[Publisher, Subscriber]:
    publisher = Publisher(PublishingConfig(pub_address=address, high_water_mark=hwm))
    sub = Subscriber(publisher.address, **subscriber)  # type: ignore[arg-type]
    # PUB/SUB joins asynchronously: publish probes until the subscriber sees one, so no message is lost to it
    for attempt in range(200):
        publisher.publish(make_result(-1 - attempt))
        if sub.receive(0.05) is not None:
            break
    while sub.receive(0.2) is not None:
        pass
    sub.received = sub.missed = 0
    sub._last_frame.clear()  # noqa: SLF001 - start counting gaps afresh, as a new subscriber would
    return publisher, sub


def test_messages_carry_header_and_pixels(tcp_address: Callable[[], str]) -> None:
    publisher, sub = connected_pair(tcp_address())
    try:
        publisher.publish(make_result(7))
        publisher.publish(make_result(8, refocused=False))
        got = [sub.receive(5.0) for _ in range(5)]
    finally:
        sub.close()
        publisher.close()
    assert all(m is not None for m in got)
    topics = [m[0]["topic"] for m in got]  # type: ignore[index]
    assert topics == ["raw", "refocused", "focus", "raw", "focus"]  # no refocused message for a skipped frame
    raw_header, raw = got[0]  # type: ignore[misc]
    assert raw_header["frame"] == 7 and raw_header["axes"] == {"t": 7, "p": 0}
    assert raw_header["shape"] == [64, 80] and raw_header["dtype"] == "uint16"
    assert raw_header["stage_z_um"] == 101.5 and raw_header["defocus_um"] == 1.25
    assert raw_header["confidence"] == 0.8 and raw_header["engine"] == "torch"
    assert raw_header["latency_ms"] == 12.5 and raw_header["t_acquired"] == 1_700_000_007.0
    np.testing.assert_array_equal(raw, make_result(7).raw)
    ref_header, refocused = got[1]  # type: ignore[misc]
    assert ref_header["dtype"] == "float32"
    np.testing.assert_array_equal(refocused, make_result(7).image)
    focus_header, no_pixels = got[2]  # type: ignore[misc]
    assert no_pixels is None and focus_header["refocused"] is True
    skipped_header, _ = got[4]  # type: ignore[misc]
    assert skipped_header["refocused"] is False and skipped_header["defocus_um"] is None
    assert "queue full" in skipped_header["reason"]
    json.dumps(skipped_header)  # strictly JSON: no NaN


def test_topic_filter(tcp_address: Callable[[], str]) -> None:
    publisher, sub = connected_pair(tcp_address(), topics=("focus",))
    try:
        for i in range(3):
            publisher.publish(make_result(i))
        got = [sub.receive(2.0) for _ in range(3)]
        assert sub.receive(0.3) is None
    finally:
        sub.close()
        publisher.close()
    assert [m[0]["topic"] for m in got] == ["focus"] * 3  # type: ignore[index]
    assert all(m[1] is None for m in got)  # type: ignore[index]


def test_no_subscriber_never_blocks(tcp_address: Callable[[], str]) -> None:
    publisher = Publisher(PublishingConfig(pub_address=tcp_address(), high_water_mark=4))
    try:
        for i in range(500):
            publisher.publish(make_result(i, shape=(256, 256)))
        stats = publisher.stats()
    finally:
        publisher.close()
    assert stats.published + stats.dropped == 1500


def test_slow_subscriber_loses_messages_and_sees_the_gap(tcp_address: Callable[[], str]) -> None:
    """A subscriber that does not read falls behind the high-water mark: the publisher goes on, the subscriber
    later sees how many frames it missed. ZeroMQ drops them at the PUB socket without telling the sender, so the
    publisher's `dropped` stays 0: only the subscriber can see the loss (issue 17)."""
    publisher, sub = connected_pair(tcp_address(), hwm=2, topics=("raw",), high_water_mark=2)
    frames = 400
    try:
        for i in range(frames):  # 400 x 512 KiB: far more than the socket buffers hold
            publisher.publish(make_result(i, shape=(512, 512)))
        received = []
        while (message := sub.receive(1.0)) is not None:
            received.append(message[0]["frame"])
        dropped_at_sender = publisher.stats().dropped
    finally:
        sub.close()
        publisher.close()
    assert received and len(received) < frames
    assert received == sorted(received)
    assert sub.missed > 0
    assert sub.missed + len(received) <= frames
    assert dropped_at_sender == 0


def test_subscriber_iteration_ends_after_timeout(tcp_address: Callable[[], str]) -> None:
    publisher, sub = connected_pair(tcp_address(), timeout_s=0.3)
    try:
        publisher.publish(make_result(0))
        with sub:
            messages = list(sub)
    finally:
        publisher.close()
    assert [h["topic"] for h, _ in messages] == ["raw", "refocused", "focus"]


def test_address_in_use_is_a_clear_error(tcp_address: Callable[[], str]) -> None:
    address = tcp_address()
    first = Publisher(PublishingConfig(pub_address=address))
    try:
        with pytest.raises(UserError, match="cannot open the publishing socket"):
            Publisher(PublishingConfig(pub_address=address))
    finally:
        first.close()


def test_control_round_trip(tcp_address: Callable[[], str]) -> None:
    state = {"paused": False}

    def pause(_: dict) -> dict:
        state["paused"] = True
        return {"paused": True}

    def fails(_: dict) -> dict:
        raise UserError("not now")

    server = ControlServer(tcp_address(), {"status": lambda r: dict(state), "pause": pause, "run": fails}).start()
    try:
        assert request(server.address, "status") == {"ok": True, "paused": False}
        assert request(server.address, "pause")["paused"] is True
        assert request(server.address, "status")["paused"] is True
        assert request(server.address, "run") == {"ok": False, "error": "not now"}
        unknown = request(server.address, "dance")
        assert not unknown["ok"] and "unknown command" in unknown["error"]
        # a raw client sending garbage gets an error reply, and the server keeps serving
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(server.address)
        sock.send(b"\xff not json")
        assert "not JSON" in json.loads(sock.recv())["error"]
        sock.close(linger=0)
        assert request(server.address, "status")["ok"]
    finally:
        server.close()


def test_no_daemon_answers(tcp_address: Callable[[], str]) -> None:
    with pytest.raises(DaemonUnavailable, match="no acquire-refocus daemon answered"):
        request(tcp_address(), "status", timeout_s=0.3)
