"""`acquire-refocus listen`: subscribe to a running daemon; print live rates and the focus trace."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from acquire_refocus.errors import UserError

_DESCRIPTION = """\
Connect to a daemon's publishing socket and print one line per focus estimate (frame, axes, stage Z, the focus
loop's offset from the planned Z, estimated defocus, confidence, whether it was refocused, latency) and, every
--every seconds, the rates: frames per second and MB/s per topic, and messages lost on the way (a subscriber that
falls behind the daemon's high-water mark loses messages; the daemon never waits for it). With the rates, a
'loop' line gives the focus loop's state per position: the offset it applied to the position's latest frame, that
frame's stage Z and time point, and the largest change of the offset seen (its moves).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--address", help="publishing address (default: publishing.pub_address of --config)")
    parser.add_argument("--config", metavar="FILE", help="config whose publishing address to use")
    parser.add_argument(
        "--topic",
        action="append",
        choices=["raw", "refocused", "focus"],
        help="topic to receive (repeatable; default: all)",
    )
    parser.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="exit when nothing arrives for S seconds (default: wait forever)",
    )
    parser.add_argument("--every", type=float, default=1.0, metavar="S", help="seconds between rate lines")
    parser.add_argument(
        "--keys",
        metavar="DIR",
        type=Path,
        help="CURVE keys of a daemon that requires them: DIR/server.key and DIR/client.key_secret "
        "(default: publishing.keys_dir of --config)",
    )


def _trace_line(header: Mapping[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = header.get(key)
        return "-" if value is None else format(value, fmt)

    axes = ",".join(f"{k}{v}" for k, v in header.get("axes", {}).items()) or "-"
    return (
        f"focus frame={header['frame']} axes={axes} stage_z_um={num('stage_z_um', '.3f')} "
        f"focus_offset_um={num('focus_offset_um', '+.3f')} "
        f"defocus_um={num('defocus_um', '+.3f')} confidence={num('confidence', '.2f')} "
        f"refocused={str(header.get('refocused')).lower()} latency_ms={num('latency_ms', '.1f')}"
    )


def note_loop_state(loop: dict[int, dict[str, float]], header: Mapping[str, Any]) -> None:
    """Update the per-position loop state from one focus message."""
    offset_um, position = header.get("focus_offset_um"), int((header.get("axes") or {}).get("p", 0))
    if offset_um is None:
        return
    state = loop.setdefault(position, {"offset_um": offset_um, "largest_move_um": 0.0})
    state["largest_move_um"] = max(state["largest_move_um"], abs(offset_um - state["offset_um"]))
    state["offset_um"] = offset_um
    stage_z_um = header.get("stage_z_um")
    state["stage_z_um"] = float(stage_z_um) if stage_z_um is not None else math.nan
    state["t"] = (header.get("axes") or {}).get("t", 0)


def loop_line(loop: dict[int, dict[str, float]]) -> str:
    """One line: the loop's state per position (note_loop_state)."""
    return "loop " + " | ".join(
        f"p{p}: t={s['t']} offset_um={s['offset_um']:+.3f} stage_z_um={s['stage_z_um']:.3f} "
        f"largest_move_um={s['largest_move_um']:.3f}"
        for p, s in sorted(loop.items())
    )


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.client import Subscriber, check_wait_s
    from acquire_refocus.config import load_config

    check_wait_s("--every", args.every)
    if args.timeout is not None:
        check_wait_s("--timeout", args.timeout)
    if args.count is not None and args.count < 1:
        raise UserError(f"--count must be a positive number of messages, got {args.count}")
    config = load_config(args.config) if args.config or not args.address else None
    address: str = (args.address or config.publishing.pub_address) if config is not None else args.address
    keys_dir = args.keys or (config.publishing.keys_dir if config is not None else None)
    topics = tuple(args.topic or ("raw", "refocused", "focus"))
    counts = {t: 0 for t in topics}
    nbytes = {t: 0 for t in topics}
    total = 0
    missed = 0
    loop: dict[int, dict[str, float]] = {}
    with Subscriber(
        address, topics=topics, timeout_s=min(args.every, args.timeout or args.every), keys_dir=keys_dir
    ) as sub:
        print(f"listening on {address} for {', '.join(topics)}", flush=True)
        t_window = last_message = time.perf_counter()
        while args.count is None or total < args.count:
            message = sub.receive()
            now = time.perf_counter()
            if message is not None:
                header, pixels = message
                topic = header.get("topic", "")
                if sub.missed > missed:  # the daemon cannot see this loss: its PUB socket drops silently
                    print(
                        f"gap {topic} frames before frame={header.get('frame')} of run {header.get('run')!r}: "
                        f"{sub.missed - missed} message(s) missed (this viewer fell behind the daemon's "
                        "publishing.high_water_mark)",
                        flush=True,
                    )
                    missed = sub.missed
                total += 1
                last_message = now
                counts[topic] = counts.get(topic, 0) + 1
                nbytes[topic] = nbytes.get(topic, 0) + (pixels.nbytes if pixels is not None else 0)
                if topic == "focus":
                    print(_trace_line(header), flush=True)
                    note_loop_state(loop, header)
            if now - t_window >= args.every or (args.count is not None and total >= args.count):
                span = max(now - t_window, 1e-9)
                rates = "  ".join(f"{t}={counts[t] / span:.1f}/s,{nbytes[t] / span / 1e6:.1f}MB/s" for t in topics)
                print(f"rates {rates}  received={sub.received} missed={sub.missed}", flush=True)
                if loop:
                    print(loop_line(loop), flush=True)
                counts = {t: 0 for t in topics}
                nbytes = {t: 0 for t in topics}
                t_window = now
            if args.timeout is not None and now - last_message >= args.timeout:
                print(f"nothing received for {args.timeout:g} s; stopping", file=sys.stderr)
                return 0 if total else 1
    return 0
