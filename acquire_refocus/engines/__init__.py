"""Inference backends behind one interface: TensorRT, ONNX Runtime, PyTorch.

`create_engine(loaded, engine_config)` picks one and never leaves the caller without an engine while plain
PyTorch can still run: a backend that is not installed, has no device, or fails to build or load is logged
with its reason and the next one in the chain is tried:

    tensorrt (CUDA + torch-tensorrt)  ->  onnxruntime  ->  torch

`backend: auto` starts the chain at the top; naming a backend starts it there (torch has no fallback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from acquire_refocus.config import EngineConfig
from acquire_refocus.engines.base import (
    BACKENDS,
    Engine,
    EngineOutOfMemoryError,
    ShapeOutOfRangeError,
)
from acquire_refocus.errors import EngineError
from acquire_refocus.logs import kv

__all__ = [
    "BACKENDS",
    "Engine",
    "EngineOutOfMemoryError",
    "ModelSource",
    "ShapeOutOfRangeError",
    "backend_availability",
    "create_engine",
]

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """What an engine needs from a loaded model (acquire_refocus.model.checkpoint.LoadedModel has it)."""

    network: torch.nn.Module  # eval mode, CPU, FP32, forward -> (image [N,1,H,W], focus [N,3]); has .stride
    sha256: str  # of the weights file: names the cached ONNX / TensorRT files


def _onnxruntime_unavailable() -> str | None:
    try:
        import onnxruntime  # noqa: F401 - importing it is the check
    except ImportError as exc:
        return f"onnxruntime is not installed: {exc}"
    return None


def _tensorrt_unavailable() -> str | None:
    from acquire_refocus.engines.tensorrt_engine import unavailable_reason

    return unavailable_reason()


def backend_availability() -> dict[str, str | None]:
    """Each backend -> None when it can run here, else the reason it cannot."""
    return {"tensorrt": _tensorrt_unavailable(), "onnxruntime": _onnxruntime_unavailable(), "torch": None}


def _build_tensorrt(loaded: ModelSource, config: EngineConfig) -> Engine:
    from acquire_refocus.engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(loaded.network, loaded.sha256, config)


def _build_onnxruntime(loaded: ModelSource, config: EngineConfig) -> Engine:
    from acquire_refocus.engines.onnx_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(loaded.network, loaded.sha256, config)


def _build_torch(loaded: ModelSource, config: EngineConfig) -> Engine:
    from acquire_refocus.engines.torch_engine import TorchEngine

    return TorchEngine(loaded.network, config)


_BUILDERS: dict[str, Callable[[ModelSource, EngineConfig], Engine]] = {
    "tensorrt": _build_tensorrt,
    "onnxruntime": _build_onnxruntime,
    "torch": _build_torch,
}


def create_engine(loaded: ModelSource, engine_config: EngineConfig | None = None) -> Engine:
    """The best engine this machine can run for `loaded`, following engine_config.backend and the fallbacks."""
    config = engine_config if engine_config is not None else EngineConfig()
    requested = config.backend
    chain = list(BACKENDS) if requested == "auto" else list(BACKENDS[BACKENDS.index(requested) :])
    availability = backend_availability()
    passed_over: list[str] = []
    for backend in chain:
        reason = availability[backend]
        if reason is None:
            try:
                engine = _BUILDERS[backend](loaded, config)
            except (EngineError, MemoryError) as exc:
                reason = f"failed to build: {exc}"
            except Exception as exc:  # any failure of an optional backend means: try the next (torch re-raises)
                reason = f"failed to build: {type(exc).__name__}: {exc}"
                if backend == "torch":
                    raise EngineError(f"the PyTorch engine, the last fallback, failed: {reason}") from exc
            else:
                log.info(
                    kv(
                        "engine_selected",
                        requested=requested,
                        engine=engine.name,
                        precision=engine.precision,
                        device=engine.device,
                        size_range_px=f"{engine.min_size_px}-{engine.max_size_px}",
                        max_batch=engine.max_batch,
                        passed_over=";".join(passed_over) or "none",
                    )
                )
                return engine
        level = (
            logging.INFO
            if requested == "auto" and reason.startswith(("no CUDA", "torch-tensorrt is not"))
            else logging.WARNING
        )
        log.log(
            level,
            kv(
                "engine_passed_over",
                requested=requested,
                engine=backend,
                reason=reason,
                next=chain[chain.index(backend) + 1] if backend != chain[-1] else "none",
            ),
        )
        passed_over.append(f"{backend}: {reason}")
    raise EngineError("no inference backend could be built here:\n  " + "\n  ".join(passed_over))
