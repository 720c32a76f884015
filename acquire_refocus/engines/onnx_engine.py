"""ONNX Runtime inference, from an ONNX export cached beside the TensorRT engines.

Export: `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter (uses onnxscript). With
torch 2.13 it is the default and the supported path; the TorchScript exporter (`dynamo=False`) still exists
but emits a DeprecationWarning on every call (and our tests run with warnings as errors). Batch, height and
width are exported dynamic, so one file serves every frame size and batch.

Cache: `<cache_dir>/<model sha256[:12]>-f<focus contract version>.onnx` plus a sidecar `<...>.onnx.json` that
records the file's own sha256 and what it was exported from. The file is written to a temporary name and renamed
into place, so a crash never leaves half a model under the real name. A file whose checksum does not match its
sidecar, or that ONNX Runtime cannot load, is logged, deleted and exported again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acquire_refocus.config import EngineConfig
from acquire_refocus.engines.base import (
    EngineOutOfMemoryError,
    check_batch,
    file_sha256,
    size_range,
    write_atomically,
)
from acquire_refocus.engines.torch_engine import network_stride
from acquire_refocus.errors import EngineError
from acquire_refocus.logs import kv
from acquire_refocus.model.network import FOCUS_CONTRACT_VERSION

log = logging.getLogger(__name__)

INPUT_NAME = "frames"
OUTPUT_NAMES = ("image", "focus")
OPSET = 18
VERIFY_TOLERANCE = 1e-3  # max abs error relative to max(1, max|output|) on a random frame at build time


def onnx_path(cache_dir: Path, model_sha256: str) -> Path:
    return Path(cache_dir) / f"{model_sha256[:12]}-f{FOCUS_CONTRACT_VERSION}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def export_onnx(network: torch.nn.Module, path: Path, model_sha256: str, example_size_px: int) -> Path:
    """Export `network` (eval, CPU, FP32) to `path` atomically, with its checksum sidecar."""
    stride = network_stride(network)
    size = max(stride, -(-example_size_px // stride) * stride)
    # Batch 2 in the example, so the exporter cannot specialise the batch dimension to 1.
    example = torch.zeros(2, 1, size, size)
    dynamic = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    model = network.eval().cpu().float()

    def write(temp: Path) -> None:
        export_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
        previous = export_logger.level
        export_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notes: irrelevant for this model
        try:
            with warnings.catch_warnings():
                # torch 2.13's exporter trips over its own deprecated pytree LeafSpec check.
                warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
                torch.onnx.export(
                    model,
                    (example,),
                    str(temp),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=(dynamic,),
                    opset_version=OPSET,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
        finally:
            export_logger.setLevel(previous)

    try:
        write_atomically(path, write)
    except EngineError:
        raise
    except Exception as exc:  # the exporter raises many types; all mean "this model cannot be exported"
        raise EngineError(f"ONNX export of the network failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    record = {
        "sha256": file_sha256(path),
        "model_sha256": model_sha256,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": OPSET,
        "torch": torch.__version__,
    }
    write_atomically(_sidecar(path), lambda temp: temp.write_text(json.dumps(record, indent=2) + "\n"))
    log.info(kv("onnx_exported", path=path, model_sha256=model_sha256[:12], opset=OPSET))
    return path


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The exporter's multi-page, colour-coded report cut to one plain log-friendly line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _cached_file_problem(path: Path) -> str | None:
    """Why the cached export cannot be trusted, or None when its checksum matches its sidecar."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return "checksum sidecar missing"
    try:
        expected = json.loads(sidecar.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"checksum sidecar unreadable ({exc})"
    actual = file_sha256(path)
    if actual != expected:
        return f"checksum mismatch (file {actual[:12]}, recorded {str(expected)[:12]})"
    return None


def _discard(path: Path, reason: str) -> None:
    log.warning(kv("onnx_cache_invalid", path=path, reason=reason, action="deleted; exporting again"))
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def session_options(num_threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ENABLE_ALL includes the CPU layout transform to blocked NCHWc convolutions: measured 2.4x faster than
    # ENABLE_EXTENDED or BASIC on 1024 px frames with the default U-Net (2-core Xeon, ORT 1.31).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    # Idle worker threads sleep instead of spinning: the daemon shares the CPU with the acquisition and
    # publishing threads. Cost measured within noise (p50 1.36 s vs 1.41 s at 1024 px).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; ORT's own warnings would flood the daemon log
    return options


class OnnxRuntimeEngine:
    """ONNX Runtime on the CUDA execution provider where the installed build has it, else the CPU one.

    Always FP32: the CPU provider has no fast FP16 convolutions, and on a GPU FP16 is TensorRT's job.
    """

    name = "onnxruntime"

    def __init__(self, network: torch.nn.Module, model_sha256: str, config: EngineConfig) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError("onnxruntime is not installed (pip install onnxruntime)") from exc
        self.stride = network_stride(network)
        self.min_size_px, self.max_size_px = size_range(self.stride, config.min_size_px, config.max_size_px)
        self.max_batch = config.max_batch
        self.tile_overlap_px = config.tile_overlap_px
        self.precision = "fp32"
        if config.precision == "fp16":
            log.info(
                kv(
                    "engine_precision",
                    engine=self.name,
                    requested="fp16",
                    running="fp32",
                    reason="ONNX Runtime runs the FP32 export; FP16 is the TensorRT engine's",
                )
            )
        self.path = onnx_path(config.cache_dir, model_sha256)
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
            providers.insert(0, "CUDAExecutionProvider")
        options = session_options(config.num_threads)

        self._session = self._open(ort, network, model_sha256, config, options, providers)
        active = self._session.get_providers()
        self.device = "cuda:0" if active and active[0] == "CUDAExecutionProvider" else "cpu"
        self.providers = tuple(active)
        self.intra_op_threads = num_threads_or_default(config.num_threads)

    def _open(
        self,
        ort: Any,
        network: torch.nn.Module,
        model_sha256: str,
        config: EngineConfig,
        options: Any,
        providers: list[str],
    ) -> Any:
        """A session on the cached export when it is sound, else on a fresh export (one attempt)."""
        if self.path.is_file():
            problem = _cached_file_problem(self.path)
            if problem is not None:
                _discard(self.path, problem)
            else:
                log.info(kv("onnx_cache_hit", path=self.path))
        for _ in range(2):
            exported = not self.path.is_file()
            if exported:
                log.info(kv("onnx_export_start", path=self.path, reason="no usable cached export for this model"))
                export_onnx(network, self.path, model_sha256, config.min_size_px)
            try:
                session = ort.InferenceSession(str(self.path), options, providers=providers)
                problem = self._verify_against(session, network)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types for unreadable models
                session, problem = None, f"onnxruntime cannot load it: {type(exc).__name__}: {exc}"
            if problem is None:
                return session
            if exported:
                self.path.unlink(missing_ok=True)
                _sidecar(self.path).unlink(missing_ok=True)
                raise EngineError(f"the fresh ONNX export of this network is unusable: {problem}")
            _discard(self.path, problem)
        raise AssertionError("unreachable: the second pass always exports afresh")

    def _verify_against(self, session: Any, network: torch.nn.Module) -> str | None:
        """Why the session cannot stand in for the network, or None: one random frame through both.

        Catches what no checksum can: a graph the exporter captured wrongly (e.g. a network that leaves torch
        for NumPy gets frozen constants) or a cached file written by an exporter that misread this network.
        """
        size = max(self.min_size_px, 2 * self.stride)
        sample = np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)
        with torch.inference_mode():
            expected = [t.float().numpy() for t in network.eval()(torch.from_numpy(sample))]
        actual = session.run(list(OUTPUT_NAMES), {INPUT_NAME: sample})
        for label, got, want in zip(OUTPUT_NAMES, actual, expected, strict=True):
            scale = max(1.0, float(np.max(np.abs(want))))
            error = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
            if not error <= VERIFY_TOLERANCE * scale:
                return (
                    f"it does not reproduce the network ({label}: max abs error {error:.3g}, "
                    f"allowed {VERIFY_TOLERANCE * scale:.3g} on a random frame)"
                )
        return None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(self, batch)
        try:
            image, focus = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        except Exception as exc:
            message = str(exc)
            if "allocat" in message.lower() or "out of memory" in message.lower():
                raise EngineOutOfMemoryError(
                    f"onnxruntime ran out of memory on {self.device} for a batch of shape {batch.shape}"
                ) from exc
            raise EngineError(f"onnxruntime failed on a batch of shape {batch.shape}: {message}") from exc
        return np.asarray(image, dtype=np.float32), np.asarray(focus, dtype=np.float32)


def num_threads_or_default(num_threads: int | None) -> int:
    """The intra-op thread count ORT ends up with: the configured one, else one per core."""
    return num_threads if num_threads is not None else (os.cpu_count() or 1)
