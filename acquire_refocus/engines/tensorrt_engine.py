"""TensorRT through torch-tensorrt's dynamo path, compiled once per model, GPU, TensorRT version and precision.

torch-tensorrt is an optional extra (`pip install acquire-refocus[trt]`) and is imported only here, lazily.

API relied on (torch-tensorrt documentation, docs.pytorch.org/TensorRT: "Dynamic shapes with Torch-TensorRT",
"Saving models compiled with Torch-TensorRT", "Saving Models with Dynamic Shapes", "Compile Mixed Precision
models"; and py/torch_tensorrt/_compile.py `compile`/`save`/`load` in pytorch/TensorRT):
- `torch_tensorrt.compile(module, ir="dynamo", inputs=[torch_tensorrt.Input(min_shape=, opt_shape=, max_shape=,
  dtype=)], enabled_precisions=...)` returns a torch.fx.GraphModule running TensorRT engines.
- FP16: recent releases type the engine explicitly from the module and input dtypes (`use_explicit_typing`,
  `enabled_precisions` deprecated and ignored on the dynamo path); older ones pick kernels from
  `enabled_precisions`. A half-precision copy of the network with an FP16 `Input`, plus
  `enabled_precisions={torch.float16}`, gives FP16 under both.
- `torch_tensorrt.save(gm, path, output_format="exported_program", arg_inputs=[Input(min/opt/max)])` infers the
  dynamic shapes from the Input objects and writes an ExportedProgram (.ep); `torch_tensorrt.load(path)`
  returns the ExportedProgram, `.module()` the callable.

Files (see trt_engines/README.md): `<sha256[:12]>_<gpu>_trt<version>_<precision>.ep` plus an `.ep.json` sidecar
with the file checksum and the compiled shape range. A different model, GPU, TensorRT version or precision is
a different name, so a stale engine is never loaded; a range mismatch, a checksum mismatch or a load failure
rebuilds in place. Nothing here can run without an NVIDIA GPU; the tests marked `gpu` exercise it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
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


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """torch-tensorrt's own deprecation and experimental-feature warnings, which are not ours to act on."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(torch_tensorrt|tensorrt|modelopt)(\.|$)")
        yield


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        with _quiet_third_party():
            import torch_tensorrt  # noqa: F401 - importing it is the check
    except ImportError as exc:
        return f"torch-tensorrt is not installed (pip install 'acquire-refocus[trt]'): {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken install (ABI mismatch with torch) must not take the daemon down
        return f"torch-tensorrt failed to import: {type(exc).__name__}: {exc}"
    return None


def tensorrt_version() -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        import torch_tensorrt

        return str(getattr(torch_tensorrt, "__tensorrt_version__", "unknown"))


def gpu_label(device_index: int = 0) -> str:
    """The GPU's marketing name as a file-name-safe token, e.g. NVIDIA-H100-80GB-HBM3."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(device_index)).strip("-")


def engine_path(cache_dir: Path, model_sha256: str, gpu: str, trt_version: str, precision: str) -> Path:
    return Path(cache_dir) / f"{model_sha256[:12]}-f{FOCUS_CONTRACT_VERSION}_{gpu}_trt{trt_version}_{precision}.ep"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class TensorRTEngine:
    """A torch-tensorrt ExportedProgram on one CUDA device, FP16 or FP32, for a range of shapes."""

    name = "tensorrt"

    def __init__(self, network: torch.nn.Module, model_sha256: str, config: EngineConfig) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise EngineError(f"TensorRT unavailable: {reason}")
        self.stride = network_stride(network)
        self.min_size_px, self.max_size_px = size_range(self.stride, config.min_size_px, config.max_size_px)
        self.opt_size_px = min(self.max_size_px, max(self.min_size_px, config.opt_size_px // self.stride * self.stride))
        self.max_batch = config.max_batch
        self.tile_overlap_px = config.tile_overlap_px
        self.precision: str = config.precision
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self._device)
        self.gpu = gpu_label(self._device.index or 0)
        self.trt_version = tensorrt_version()
        self.path = engine_path(config.cache_dir, model_sha256, self.gpu, self.trt_version, self.precision)
        self._shape_record = {
            "min_shape": [1, 1, self.min_size_px, self.min_size_px],
            "opt_shape": [1, 1, self.opt_size_px, self.opt_size_px],
            "max_shape": [self.max_batch, 1, self.max_size_px, self.max_size_px],
        }
        self._note_stale_engines(Path(config.cache_dir), model_sha256)
        module = self._load_cached()
        if module is None:
            module = self._build_and_save(network, model_sha256)
        self._module = module

    def _note_stale_engines(self, cache_dir: Path, model_sha256: str) -> None:
        others = sorted(p.name for p in cache_dir.glob(f"{model_sha256[:12]}*.ep") if p != self.path)
        if others:
            log.info(
                kv(
                    "tensorrt_engines_ignored",
                    wanted=self.path.name,
                    ignored=",".join(others),
                    reason="built for another GPU, TensorRT version, precision or focus contract",
                )
            )

    def _load_cached(self) -> Any | None:
        if not self.path.is_file():
            log.info(kv("tensorrt_engine_missing", path=self.path, action="building (takes minutes)"))
            return None
        problem = self._cached_file_problem()
        if problem is not None:
            self._discard(problem)
            return None
        try:
            import torch_tensorrt

            with _quiet_third_party():
                module = torch_tensorrt.load(str(self.path)).module()
            self._smoke_test(module)
        except Exception as exc:  # noqa: BLE001 - deserialisation errors come from TensorRT's C++ runtime, many types
            self._discard(f"cannot be loaded: {type(exc).__name__}: {exc}")
            return None
        log.info(kv("tensorrt_engine_loaded", path=self.path, precision=self.precision, gpu=self.gpu))
        return module

    def _cached_file_problem(self) -> str | None:
        """Why the cached engine cannot be trusted for this configuration, or None."""
        try:
            record = json.loads(_sidecar(self.path).read_text())
        except (OSError, ValueError) as exc:
            return f"sidecar missing or unreadable ({exc})"
        if not isinstance(record, dict) or record.get("sha256") != file_sha256(self.path):
            return "checksum mismatch: the file changed after it was built"
        if any(record.get(key) != value for key, value in self._shape_record.items()):
            return "built for another shape range than engine.min/opt/max_size_px and max_batch"
        return None

    def _discard(self, reason: str) -> None:
        log.warning(kv("tensorrt_engine_invalid", path=self.path, reason=reason, action="deleted; rebuilding"))
        self.path.unlink(missing_ok=True)
        _sidecar(self.path).unlink(missing_ok=True)

    def _build_and_save(self, network: torch.nn.Module, model_sha256: str) -> Any:
        import torch_tensorrt

        started = time.monotonic()
        # A copy: the caller's network stays on the CPU in FP32 (the ONNX export and the fallbacks use it).
        model = copy.deepcopy(network).eval().to(self._device, self._dtype)
        spec = torch_tensorrt.Input(
            min_shape=tuple(self._shape_record["min_shape"]),
            opt_shape=tuple(self._shape_record["opt_shape"]),
            max_shape=tuple(self._shape_record["max_shape"]),
            dtype=self._dtype,
        )
        try:
            with _quiet_third_party():
                compiled = torch_tensorrt.compile(
                    model,
                    ir="dynamo",
                    inputs=[spec],
                    enabled_precisions={self._dtype},
                    # FP32 means FP32: TensorRT would otherwise run convolutions in TF32 (10-bit mantissa).
                    disable_tf32=self.precision == "fp32",
                )
                self._smoke_test(compiled)

                def write(temp: Path) -> None:
                    torch_tensorrt.save(compiled, str(temp), output_format="exported_program", arg_inputs=[spec])

                write_atomically(self.path, write)
        except torch.OutOfMemoryError as exc:
            raise EngineError(f"out of GPU memory while building the TensorRT engine: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"TensorRT build failed: {type(exc).__name__}: {exc}") from exc
        finally:
            del model
        record = {
            "sha256": file_sha256(self.path),
            "model_sha256": model_sha256,
            "gpu": self.gpu,
            "tensorrt": self.trt_version,
            "torch_tensorrt": torch_tensorrt.__version__,
            "precision": self.precision,
            **self._shape_record,
        }
        write_atomically(_sidecar(self.path), lambda temp: temp.write_text(json.dumps(record, indent=2) + "\n"))
        log.info(
            kv(
                "tensorrt_engine_built",
                path=self.path,
                seconds=round(time.monotonic() - started, 1),
                precision=self.precision,
                gpu=self.gpu,
                tensorrt=self.trt_version,
            )
        )
        # Run what was saved, so that what the daemon runs is what a restart will load.
        with _quiet_third_party():
            return torch_tensorrt.load(str(self.path)).module()

    def _smoke_test(self, module: Any) -> None:
        size = self.min_size_px
        with torch.inference_mode():
            image, focus = module(torch.zeros(1, 1, size, size, device=self._device, dtype=self._dtype))
        if tuple(image.shape) != (1, 1, size, size) or tuple(focus.shape) != (1, 3):
            raise EngineError(f"engine returned shapes {tuple(image.shape)}, {tuple(focus.shape)}")

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(self, batch)
        try:
            with torch.inference_mode():
                x = torch.from_numpy(batch).to(self._device, self._dtype, non_blocking=True)
                image, focus = self._module(x)
                return image.float().cpu().numpy(), focus.float().cpu().numpy()
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineOutOfMemoryError(f"TensorRT ran out of GPU memory for a batch of shape {batch.shape}") from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                torch.cuda.empty_cache()
                raise EngineOutOfMemoryError(
                    f"TensorRT ran out of GPU memory for a batch of shape {batch.shape}"
                ) from exc
            raise EngineError(f"TensorRT failed on a batch of shape {batch.shape}: {exc}") from exc
