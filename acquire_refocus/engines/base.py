"""The one interface every inference backend honours, and the checks they share.

An engine runs the refocus network on a batch of normalised frames. It knows the frame sizes it was built
for (`min_size_px`..`max_size_px`, multiples of `stride`) and the largest batch (`max_batch`); anything else
is the caller's job (`acquire_refocus.engines.tiling` pads, tiles and crops back).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from acquire_refocus.errors import EngineError

BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime", "torch")


class ShapeOutOfRangeError(EngineError):
    """A batch whose shape the engine was not built for (callers tile or pad instead)."""


class EngineOutOfMemoryError(EngineError):
    """The device ran out of memory for this batch (callers split the batch or use smaller tiles)."""


@runtime_checkable
class Engine(Protocol):
    """A loaded network ready to run; construct it through `create_engine`."""

    name: str  # "tensorrt" | "onnxruntime" | "torch"
    precision: str  # "fp16" | "fp32": what actually runs, not what was asked for
    device: str  # "cpu" | "cuda:0" ...
    min_size_px: int  # smallest H and W accepted (a multiple of stride)
    max_size_px: int  # largest H and W accepted (a multiple of stride)
    max_batch: int  # largest N accepted
    stride: int  # H and W must be multiples of it
    tile_overlap_px: int  # overlap of neighbouring tiles when a frame is larger than max_size_px

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N,1,H,W] normalised frames -> (images float32 [N,1,H,W], focus float32 [N,3]).

        focus[:, 0] is the defocus in um, focus[:, 1] the log of its predicted standard deviation in um,
        focus[:, 2] the unsigned |defocus| in um (see model.network).
        """
        ...


def size_range(stride: int, min_size_px: int, max_size_px: int) -> tuple[int, int]:
    """The configured size range snapped inwards to multiples of the network stride."""
    low = max(stride, -(-min_size_px // stride) * stride)
    high = (max_size_px // stride) * stride
    if high < low:
        raise EngineError(
            f"engine size range {min_size_px}..{max_size_px} px holds no multiple of the network stride {stride}; "
            f"set engine.max_size_px to at least {low}"
        )
    return low, high


def check_batch(engine: Engine, batch: np.ndarray) -> np.ndarray:
    """Validate a batch against what the engine was built for; returns it as contiguous float32."""
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ShapeOutOfRangeError(f"{engine.name} engine: expected a batch [N,1,H,W], got shape {batch.shape}")
    n, _, height, width = batch.shape
    if not 1 <= n <= engine.max_batch:
        raise ShapeOutOfRangeError(f"{engine.name} engine: batch of {n} outside 1..{engine.max_batch}")
    for label, size in (("height", height), ("width", width)):
        if size % engine.stride or not engine.min_size_px <= size <= engine.max_size_px:
            raise ShapeOutOfRangeError(
                f"{engine.name} engine: frame {label} {size} px is outside the built range "
                f"{engine.min_size_px}..{engine.max_size_px} px or not a multiple of {engine.stride}"
            )
    return np.ascontiguousarray(batch, dtype=np.float32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it into place.

    A crash or a concurrent reader never sees a half-written engine file: the rename is atomic on POSIX
    and Windows (os.replace) within one directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
