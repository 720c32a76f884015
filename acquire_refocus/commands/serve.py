"""`acquire-refocus serve`: the headless daemon on the acquisition stream."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from acquire_refocus.config import load_config

_DESCRIPTION = """\
Run the acquisition-side daemon. It loads the refocusing model on the configured engine, opens the
publishing socket (ZeroMQ PUB: topics raw, refocused, focus) and the control socket (ZeroMQ REP), and then
either waits for sequences sent with 'acquire-refocus run FILE' or, with --once, acquires the config's
acquisition.sequence and exits.

Every frame goes to a bounded queue; a worker refocuses it and estimates its defocus; the results are
published and saved beside the raw data (refocused.ome.zarr, focus.csv, run.json; raw.ome.zarr is written by
the acquisition backend). With focus.mode: correct the estimates move the Z stage between time points.
SIGINT / SIGTERM (or 'acquire-refocus stop') cancel the acquisition, drain the queue, close the stores, exit 0.
The log goes to stderr and to DIR/acquire-refocus.log (rotated by size; the config's log_file section).

Backends (acquisition.backend): simulator (no hardware), pymmcore-plus (acquisition.mm_config_file),
pycromanager (the Micro-Manager desktop application with its server on acquisition.pycromanager_port).
"""

_EPILOG = """\
examples:
  acquire-refocus serve --config configs/simulator.yaml --output runs/sim --once
  acquire-refocus serve --config my-scope.yaml --output D:/data/today      # then: acquire-refocus run seq.yaml
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: the built-in simulated microscope)")
    parser.add_argument(
        "--output",
        metavar="DIR",
        type=Path,
        help="where runs are saved (--once: DIR itself; otherwise DIR/run-NNN per run); "
        "default storage.output_dir, and nothing is saved when neither is set",
    )
    parser.add_argument("--once", action="store_true", help="acquire acquisition.sequence once, then exit")


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)  # stopped while starting: nothing acquired yet, nothing to drain


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.daemon import Daemon, refuse_previous_run
    from acquire_refocus.errors import ConfigError
    from acquire_refocus.focus.controller import check_hold
    from acquire_refocus.logs import log_file
    from acquire_refocus.sequence import parse_sequence, z_planes

    config = load_config(args.config)
    output: Path | None = args.output or config.storage.output_dir
    if args.once:  # check before the (slow) model load
        if config.acquisition.sequence is None:
            raise ConfigError("acquisition.sequence: required with --once (inline, or a YAML/JSON file path)")
        check_hold(config.focus, z_planes(parse_sequence(config.acquisition.sequence)))
        if output is not None:  # before the log file goes into it
            refuse_previous_run(output)
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    with (
        log_file(config.log_file, output),
        Daemon(config, output_dir=args.output) as daemon,
    ):
        return daemon.serve(once=args.once)
