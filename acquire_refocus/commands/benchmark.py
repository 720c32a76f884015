"""`acquire-refocus benchmark`: latency and throughput of each engine, the simulated camera and the daemon path.

The measuring code lives in tools/benchmark.py of the checkout (loaded by path), beside the simulator and
daemon benchmark parts it combines.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from acquire_refocus.commands.build_engine import add_model_arguments, load_model
from acquire_refocus.config import PROJECT_ROOT, load_config
from acquire_refocus.errors import UserError
from acquire_refocus.outputs import json_output_file

TOOL = PROJECT_ROOT / "tools" / "benchmark.py"

_DESCRIPTION = """\
Measure how fast the refocus network runs on this machine, per engine (TensorRT, ONNX Runtime, PyTorch),
frame size and batch size: median and 99th-percentile latency, throughput, peak memory, and whether each size
keeps up with a typical camera (2048 px at 100 fps, 1024 px at 200 fps, 512 px at 400 fps). Engines are
timed round-robin in one run so that load from other programs hits them alike. Also measures the simulated
camera and the daemon path (hook, ZeroMQ publishing, overhead) when those benchmark parts are present.

Prints a table; --json writes a JSON list of records (engine, precision, device, size, batch, p50_ms, p99_ms,
fps, ...; the machine description is in every record under "machine").
"""

_EPILOG = """\
examples:
  acquire-refocus benchmark
  acquire-refocus benchmark --sizes 512,2048 --engines onnxruntime,torch --json reports/bench.json
  acquire-refocus benchmark --sizes 256 --repeats 3 --parts engine --untrained
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    parser.add_argument(
        "--sizes",
        type=_int_list,
        default=[512, 1024, 2048],
        help="square frame sizes in px, comma-separated, multiples of the network stride and at "
        "most engine.max_size_px (default 512,1024,2048)",
    )
    parser.add_argument(
        "--engines",
        type=_name_list,
        default=None,
        help="engines to time, comma-separated: tensorrt,onnxruntime,torch (default: all available)",
    )
    parser.add_argument(
        "--batches",
        type=_int_list,
        default=None,
        help="batch sizes to try (default: 1,2,4,8 up to engine.max_batch, as far as memory allows)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per engine, size and batch (default 10)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per engine (default: engine.num_threads from the config, else all cores)",
    )
    parser.add_argument(
        "--parts",
        type=_name_list,
        default=["engine", "simulator", "daemon"],
        help="what to measure: engine,simulator,daemon (default: all)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")


def load_tool() -> ModuleType:
    if not TOOL.is_file():
        raise UserError(
            f"{TOOL} not found: the benchmark runs from a source checkout (git clone, then 'pip install -e .'), "
            "where tools/benchmark.py sits beside the package"
        )
    spec = importlib.util.spec_from_file_location("acquire_refocus_tools_benchmark", TOOL)
    if spec is None or spec.loader is None:
        raise UserError(f"{TOOL}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    unknown = [part for part in args.parts if part not in ("engine", "simulator", "daemon")]
    if unknown:
        raise UserError(f"--parts: unknown part(s) {', '.join(unknown)}; choose from engine, simulator, daemon")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.json is not None:  # before minutes of measuring, not after
        json_output_file(args.json)
    tool = load_tool()
    config = load_config(args.config)
    engine_config = config.engine
    if args.threads is not None:
        engine_config = engine_config.model_copy(update={"num_threads": args.threads})
    model, label = load_model(args, config) if "engine" in args.parts else (None, "")
    tool.run_benchmark(
        model,
        engine_config,
        sizes=args.sizes,
        engines=args.engines,
        repeats=args.repeats,
        batches=args.batches,
        parts=args.parts,
        model_label=label,
        json_path=args.json,
    )
    return 0
