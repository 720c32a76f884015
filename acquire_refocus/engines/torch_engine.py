"""Plain PyTorch inference: the reference every other backend is compared with, and the last fallback."""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from acquire_refocus.config import EngineConfig
from acquire_refocus.engines.base import EngineOutOfMemoryError, check_batch, size_range
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)


def network_stride(network: torch.nn.Module) -> int:
    stride = getattr(network, "stride", None)
    if not isinstance(stride, int) or stride < 1:
        raise TypeError(f"{type(network).__name__} has no positive integer .stride; engines need it to pad frames")
    return stride


class TorchEngine:
    """Eager PyTorch in eval mode under `torch.inference_mode`.

    On CPU it always runs FP32 (half precision on CPU is slower, not faster). On CUDA it honours
    `precision`: FP16 runs a half-precision copy of the network.
    """

    name = "torch"

    def __init__(self, network: torch.nn.Module, config: EngineConfig, device: str | None = None) -> None:
        self.stride = network_stride(network)
        self.min_size_px, self.max_size_px = size_range(self.stride, config.min_size_px, config.max_size_px)
        self.max_batch = config.max_batch
        self.tile_overlap_px = config.tile_overlap_px
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.device = str(self._device)
        if self._device.type == "cpu" and config.num_threads is not None:
            # Process-wide in PyTorch; the daemon runs one engine, so this is the engine's setting.
            torch.set_num_threads(config.num_threads)
        half = self._device.type == "cuda" and config.precision == "fp16"
        self.precision = "fp16" if half else "fp32"
        if config.precision == "fp16" and not half:
            log.info(
                kv(
                    "engine_precision",
                    engine=self.name,
                    requested="fp16",
                    running="fp32",
                    reason="no CUDA device; FP16 on CPU is slower than FP32",
                )
            )
        # A copy, so moving or casting never changes the caller's network (the ONNX exporter shares it).
        model = copy.deepcopy(network).eval().to(self._device)
        self._dtype = torch.float16 if half else torch.float32
        self._network = model.to(self._dtype)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(self, batch)
        try:
            with torch.inference_mode():
                x = torch.from_numpy(batch).to(self._device, self._dtype)
                image, focus = self._network(x)
                return (
                    image.float().cpu().numpy(),
                    focus.float().cpu().numpy(),
                )
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineOutOfMemoryError(
                f"torch engine ran out of memory on {self.device} for a batch of shape {tuple(batch.shape)}"
            ) from exc
