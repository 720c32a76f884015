"""`acquire-refocus build-engine`: compile the network for this machine ahead of time."""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from acquire_refocus.config import AppConfig, load_config
from acquire_refocus.engines import ModelSource, backend_availability, create_engine
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv
from acquire_refocus.outputs import output_folder

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Build the inference engines for this machine now, instead of on the daemon's first start:
- ONNX Runtime: exports the network to ONNX (<cache_dir>/<model-sha256[:12]>.onnx).
- TensorRT (only with an NVIDIA GPU and 'pip install acquire-refocus[trt]'): compiles the network with
  torch-tensorrt for the frame sizes in the config's engine section (min/opt/max_size_px, max_batch) and saves
  <cache_dir>/<model-sha256[:12]>_<gpu>_trt<version>_<precision>.ep. Takes minutes.
PyTorch needs nothing built. Files already built for the same model, GPU, TensorRT version and precision are
checked and reused; damaged or mismatched ones are rebuilt. The cache directory is engine.cache_dir
(default: trt_engines/ in a source checkout, else the user's cache directory, e.g.
~/.cache/acquire-refocus/engines).
"""

_EPILOG = """\
examples:
  acquire-refocus build-engine
  acquire-refocus build-engine --config configs/simulator.yaml --weights runs/train/best.pt
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config (default: built-in defaults); its engine: section sets sizes and cache",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights file (default: model.weights from the config, else the shipped model)",
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="use a freshly initialised network of the config's model: architecture instead of "
        "weights (speed depends only on the architecture)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    parser.add_argument(
        "--backend",
        choices=["all", "tensorrt", "onnxruntime"],
        default="all",
        help="which engine to build (default: every one this machine can run)",
    )


@dataclass
class UntrainedModel:
    """A freshly initialised network (fixed seed) named by the hash of its parameters."""

    network: torch.nn.Module
    sha256: str
    label: str


def untrained_model(config: AppConfig) -> UntrainedModel:
    from acquire_refocus.model.network import build_network

    torch.manual_seed(0)
    network = build_network(config.model, load_pretrained=False).eval()
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    digest = hashlib.sha256(buffer.getvalue() + config.model.model_dump_json().encode()).hexdigest()
    settings = config.model.model_dump(exclude={"architecture", "weights", "weights_per_channel", "pretrained_encoder"})
    label = f"untrained {config.model.architecture} " + " ".join(f"{name}={value}" for name, value in settings.items())
    return UntrainedModel(network, digest, label)


def load_model(args: argparse.Namespace, config: AppConfig) -> tuple[ModelSource, str]:
    """The model named on the command line or in the config, and a label saying which it is."""
    if args.untrained:
        if args.weights is not None:
            raise UserError("--untrained and --weights exclude each other")
        model = untrained_model(config)
        return model, model.label
    from acquire_refocus.model.checkpoint import load_weights

    path = args.weights if args.weights is not None else config.model.weights
    loaded = load_weights(path)
    return loaded, f"{'shipped default' if path is None else path} (sha256 {loaded.sha256[:12]})"


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    output_folder(config.engine.cache_dir, "engine.cache_dir")  # a bad path is the user's to fix, not a failed build
    model, label = load_model(args, config)
    availability = backend_availability()
    wanted = ["tensorrt", "onnxruntime"] if args.backend == "all" else [args.backend]
    failures = 0
    print(f"model: {label}")
    print(f"engine cache: {config.engine.cache_dir}")
    for backend in wanted:
        reason = availability[backend]
        if reason is not None:
            print(f"{backend}: not built: {reason}")
            failures += args.backend != "all"
            continue
        engine = create_engine(model, config.engine.model_copy(update={"backend": backend}))
        if engine.name != backend:
            print(f"{backend}: FAILED to build (see the log above); the daemon would fall back to {engine.name}")
            failures += 1
            continue
        path = getattr(engine, "path", None)  # the file an engine was built into (ONNX and TensorRT engines)
        print(
            f"{backend}: {path} ({engine.precision}, {engine.device}, "
            f"{engine.min_size_px}-{engine.max_size_px} px, batch <= {engine.max_batch})"
        )
        log.info(kv("engine_built", engine=backend, path=path))
    print("torch: nothing to build")
    return 1 if failures else 0
