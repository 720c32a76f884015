"""`acquire-refocus status | pause | resume | run FILE | stop`: talk to a running daemon's control socket."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from acquire_refocus.config import load_config
from acquire_refocus.errors import UserError

_HELP = {
    "status": "Print a running daemon's state: queue depth, frames seen / refocused / skipped / failed, messages "
    "published / dropped, engine, focus offsets, paused or not, output directory.",
    "pause": "Pause correction in a running daemon. Frames are still acquired, saved raw, counted and published raw.",
    "resume": "Resume correction in a running daemon.",
    "run": "Send a useq-schema MDASequence (YAML or JSON file) to a running daemon, which acquires it next.",
    "stop": "Ask a running daemon to cancel its acquisition, drain its queue, close its stores and exit.",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    parser.description = _HELP.get(command, parser.description or "") + (
        " Exits 1, with a message, when no daemon answers within --timeout."
    )
    if command == "run":
        parser.add_argument("file", metavar="FILE", type=Path, help="MDASequence as YAML or JSON")
        parser.add_argument("--output", metavar="DIR", help="save this run here (default: the daemon's DIR/run-NNN)")
    parser.add_argument("--address", help="control address (default: publishing.control_address of --config)")
    parser.add_argument("--config", metavar="FILE", help="config whose control address to use")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for an answer")
    parser.add_argument(
        "--keys",
        metavar="DIR",
        type=Path,
        help="CURVE keys of a daemon that requires them: DIR/server.key and DIR/client.key_secret "
        "(default: publishing.keys_dir of --config)",
    )
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print the raw JSON reply")
        parser.add_argument(
            "--run",
            metavar="DIR",
            type=Path,
            help="instead of asking a daemon, read the run saved in DIR (its run.json): completed, "
            "failed, cancelled, running, or interrupted (killed while running)",
        )


def _print_status(reply: dict[str, Any]) -> None:
    counts = reply.get("counts") or {}
    publishing = reply.get("publishing") or {}
    focus = reply.get("focus") or {}
    lines = [
        f"state        {reply.get('state')}  (run {reply.get('run') or '-'}, paused: {reply.get('paused')})",
        f"engine       {reply.get('engine')}   backend {reply.get('backend')}",
        f"output       {reply.get('output_dir') or 'not saved'}",
        "frames       seen {seen}  refocused {refocused}  skipped {skipped}  failed {failed}  "
        "paused {paused_frames}".format(
            **{k: counts.get(k, 0) for k in ("seen", "refocused", "skipped", "failed", "paused_frames")}
        ),
        f"queue        {counts.get('queue_depth', 0)} / {counts.get('queue_size', '-')}",
        f"publishing   {publishing.get('address', 'off')}  published {publishing.get('published', 0)}  "
        f"dropped {publishing.get('dropped', 0)}",
        f"focus        mode {focus.get('mode')}  offsets_um {focus.get('offsets_um', {})}  "
        f"last_defocus_um {focus.get('last_defocus_um', {})}  moves {focus.get('moves', 0)}",
    ]
    if reply.get("engine_fallback"):
        lines.insert(2, f"             {reply['engine_fallback']}")
    if reply.get("interrupted_runs"):
        lines.append(f"interrupted  {', '.join(reply['interrupted_runs'])} (killed while running; see README)")
    print("\n".join(lines))


def _print_saved_run(folder: Path, as_json: bool) -> int:
    """The state of the run saved in `folder`; exit 0 only for a completed run."""
    from acquire_refocus.storage import read_run_state

    record = read_run_state(folder)
    if record is None:
        raise UserError(f"{folder}: no run.json here; give the folder a run was saved in")
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        counts = record.get("counts") or {}
        raw = record.get("raw_frames") or {}
        print(
            f"state        {record.get('state')}  (run {record.get('run', '-')}, started {record.get('started')}, "
            f"ended {record.get('ended') or '-'})"
        )
        print(
            f"frames       seen {counts.get('seen', '-')}  refocused {counts.get('refocused', '-')}  raw on disk "
            f"{raw.get('on_disk', '-')} of {raw.get('acquired', '-')}"
        )
        if record.get("error"):
            print(f"error        {record['error']}")
        if record.get("state") == "interrupted":
            print(
                "note         the process ended while the run was going on; the raw frames written are in "
                "raw.ome.zarr, their metadata in raw_frames.jsonl and focus.csv"
            )
    return 0 if record.get("state") == "completed" else 1


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.client import check_wait_s
    from acquire_refocus.control import DaemonUnavailable, request
    from acquire_refocus.sequence import parse_sequence

    if getattr(args, "run", None) is not None:
        return _print_saved_run(args.run, args.json)
    check_wait_s("--timeout", args.timeout)
    config = load_config(args.config) if args.config or not args.address else None
    address = args.address if config is None else args.address or config.publishing.control_address
    keys_dir = args.keys or (config.publishing.keys_dir if config is not None else None)
    fields: dict[str, Any] = {}
    if args.command == "run":
        try:  # a bad file fails here, with its name
            sequence = parse_sequence(args.file, str(args.file))
        except UnicodeDecodeError:
            raise UserError(f"{args.file}: not a YAML/JSON text file") from None
        except OSError as exc:
            raise UserError(f"{args.file}: cannot read it: {exc.strerror or exc}") from None
        fields["sequence"] = sequence.model_dump(mode="json", exclude_unset=True)
        if args.output:
            fields["output"] = str(Path(args.output).resolve())
    try:
        reply = request(address, args.command, timeout_s=args.timeout, keys_dir=keys_dir, **fields)
    except DaemonUnavailable as exc:
        print(f"acquire-refocus {args.command}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"acquire-refocus {args.command}: the daemon refused: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.command == "status" and not args.json:
        _print_status(reply)
    else:
        print(json.dumps(reply, indent=2))
    return 0
