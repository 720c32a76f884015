"""The `acquire-refocus` command. Each subcommand lives in `acquire_refocus.commands.<module>` with
`add_arguments(parser)` and `run(args) -> int`; only the chosen one is imported, so `--help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from acquire_refocus.errors import UserError
from acquire_refocus.logs import setup_logging

# name -> (module under acquire_refocus.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole thing on the simulated microscope: drift, closed-loop focus, publish, save"),
    "simulate": ("simulate", "write simulated BBBC006-like z-stacks with known defocus (training/evaluation data)"),
    "train": ("train", "train the refocus network on simulated or stored z-stacks"),
    "evaluate": ("evaluate", "compare the network with the raw input and deconvolution baselines; write a report"),
    "correct": ("correct", "refocus a dataset or plate (on a Dask cluster) or TIFF files offline; estimate defocus"),
    "qc": ("qc", "focus-quality report of a corrected dataset: plate heatmap, histogram, worst frames, re-image list"),
    "calibrate-focus": (
        "calibrate_focus",
        "fit how image sharpness falls with defocus on your z-stacks; print focus settings",
    ),
    "calibrate-model": (
        "calibrate_model",
        "choose where the model mixes in Wiener deconvolution, on its validation frames; write the weights",
    ),
    "build-engine": ("build_engine", "compile the network for this machine (TensorRT / ONNX) ahead of time"),
    "benchmark": ("benchmark", "measure latency and throughput of each engine and of the daemon path"),
    "serve": ("serve", "run the headless daemon on the acquisition stream"),
    "keys": ("keys", "create CURVE keys so that only holders of a client key can drive or watch the daemon"),
    "listen": ("listen", "subscribe to a running daemon and print live rates and the focus trace"),
    "status": ("control", "ask a running daemon for its queue, counts, engine and focus offset"),
    "pause": ("control", "pause correction in a running daemon (raw frames are still saved)"),
    "resume": ("control", "resume correction in a running daemon"),
    "run": ("control", "send an MDASequence (YAML/JSON file) to a running daemon to acquire"),
    "stop": ("control", "ask a running daemon to drain its queue, close its stores and exit"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acquire-refocus",
        description="Acquisition-side focus correction for fluorescence microscopes. "
        "Run 'acquire-refocus demo' to see it work on the simulated microscope.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<15} {text}" for name, (_, text) in COMMANDS.items())
        + "\n\n'acquire-refocus COMMAND --help' explains each one.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see the list below")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log_level = "INFO"
    if "--log-level" in argv:
        index = argv.index("--log-level")
        if index + 1 < len(argv):
            log_level = argv[index + 1].upper()
            del argv[index : index + 2]
    if not argv or argv[0] not in COMMANDS:
        _top_level_parser().parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(f"acquire_refocus.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"acquire-refocus {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.command = name
    setup_logging(log_level)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"acquire-refocus {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("acquire_refocus").warning("event=interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
