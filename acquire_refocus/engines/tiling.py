"""Frames of any size through an engine of fixed size range: pad, tile, blend, crop back.

- Padding: reflect padding up to a multiple of the network stride (and up to the engine's minimum size),
  cropped off again exactly, so the output has the input's shape pixel for pixel. Reflection continues the
  image statistics across the border, where zero padding would add a dark frame the network never saw.
- Tiling: a frame larger than `engine.max_size_px` is cut into overlapping tiles whose origins are multiples
  of the stride (the U-Net is shift-equivariant only for such shifts). Each tile's image is weighted by a
  raised-cosine (Hann) ramp over exactly the band it shares with each neighbour and 1 elsewhere; for two
  neighbours the ramps add up to 1, and the weighted sum is divided by the summed weights in any case, so
  the blend has no seam and tile borders (where the network sees least context) contribute least.
- Focus: every tile estimates the defocus d_i with uncertainty sigma_i. They are combined by inverse-variance
  weighting, w_i = 1 / sigma_i**2, d = sum(w_i d_i) / sum(w_i). The tiles look at the same specimen with the
  same optics, so their errors are correlated and the textbook 1/sqrt(sum w_i) would be over-confident;
  the reported variance is the harmonic mean of the tile variances (a typical tile's uncertainty) plus the
  weighted spread of the tile estimates (which grows when the sample is tilted or tiles disagree). The
  unsigned |defocus| is combined with the same weights.
- Out of memory: a batch is split; a single tile that still does not fit is retried with tiles half as large.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from acquire_refocus.engines.base import Engine, EngineOutOfMemoryError
from acquire_refocus.errors import InputError
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)


_TILING_ANNOUNCED: set[tuple[str, int, int, int]] = set()


def _padded_length(length: int, engine: Engine) -> int:
    return max(engine.min_size_px, -(-length // engine.stride) * engine.stride)


def _pad(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad bottom and right; numpy reflects repeatedly when the pad exceeds the frame."""
    pad_h, pad_w = height - frame.shape[0], width - frame.shape[1]
    if pad_h == 0 and pad_w == 0:
        return frame
    return np.pad(frame, ((0, pad_h), (0, pad_w)), mode="reflect")


def _tile_starts(length: int, tile: int, overlap: int, stride: int) -> list[int]:
    """Stride-aligned origins of tiles of `tile` px covering `length` px, neighbours sharing >= `overlap` px."""
    if length <= tile:
        return [0]
    step_max = max(stride, ((tile - overlap) // stride) * stride)
    gaps = math.ceil((length - tile) / step_max)
    step = -(-math.ceil((length - tile) / gaps) // stride) * stride  # even spacing, rounded up to the stride
    return [min(i * step, length - tile) for i in range(gaps + 1)]


def _ramp(length: int) -> np.ndarray:
    """Rising raised-cosine weights over `length` px, strictly between 0 and 1."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(length) + 0.5) / length)


def _window_1d(starts: list[int], index: int, tile: int) -> np.ndarray:
    weights = np.ones(tile, dtype=np.float64)
    if index > 0:
        shared = starts[index - 1] + tile - starts[index]
        weights[:shared] *= _ramp(shared)
    if index < len(starts) - 1:
        shared = starts[index] + tile - starts[index + 1]
        weights[tile - shared :] *= _ramp(shared)[::-1]
    return weights


@dataclass(frozen=True)
class FrameFocus:
    """The focus head's output for one frame."""

    defocus_um: float
    log_sigma_um: float
    magnitude_um: float  # unsigned |defocus|


def combine_focus(focus: np.ndarray) -> FrameFocus:
    """Tile estimates [T,3] -> one: inverse-variance means and a conservative combined log sigma (see module
    docstring)."""
    focus = np.asarray(focus, dtype=np.float64)
    weights = 1.0 / np.exp(2.0 * focus[:, 1])
    mean = float(np.sum(weights * focus[:, 0]) / np.sum(weights))
    spread = float(np.sum(weights * (focus[:, 0] - mean) ** 2) / np.sum(weights))
    typical = float(len(weights) / np.sum(weights))
    magnitude = float(np.sum(weights * focus[:, 2]) / np.sum(weights))
    return FrameFocus(mean, 0.5 * math.log(typical + spread), magnitude)


def run_batched(engine: Engine, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run [N,1,H,W] in chunks of engine.max_batch, halving the chunk when the device runs out of memory."""
    chunk = engine.max_batch
    images, focus = [], []
    start = 0
    while start < len(batch):
        part = batch[start : start + chunk]
        try:
            image_part, focus_part = engine.run(part)
        except EngineOutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            log.warning(kv("engine_out_of_memory", engine=engine.name, shape=tuple(part.shape), retry_batch=chunk))
            continue
        images.append(image_part)
        focus.append(focus_part)
        start += len(part)
    return np.concatenate(images), np.concatenate(focus)


def _infer_tiled(engine: Engine, padded: np.ndarray, tile_px: int, overlap_px: int) -> tuple[np.ndarray, FrameFocus]:
    height, width = padded.shape
    tile_h, tile_w = min(tile_px, height), min(tile_px, width)
    starts_y = _tile_starts(height, tile_h, overlap_px, engine.stride)
    starts_x = _tile_starts(width, tile_w, overlap_px, engine.stride)
    tiles = np.stack([padded[y : y + tile_h, x : x + tile_w] for y in starts_y for x in starts_x])[:, None]
    images, focus = run_batched(engine, tiles)
    blended = np.zeros((height, width), dtype=np.float64)
    total = np.zeros((height, width), dtype=np.float64)
    k = 0
    for iy, y in enumerate(starts_y):
        window_y = _window_1d(starts_y, iy, tile_h)
        for ix, x in enumerate(starts_x):
            window = np.outer(window_y, _window_1d(starts_x, ix, tile_w))
            blended[y : y + tile_h, x : x + tile_w] += window * images[k, 0]
            total[y : y + tile_h, x : x + tile_w] += window
            k += 1
    return (blended / total).astype(np.float32), combine_focus(focus)


def infer_frame(engine: Engine, frame: np.ndarray, overlap_px: int | None = None) -> tuple[np.ndarray, FrameFocus]:
    """One normalised 2-D frame -> (image float32 same shape, its focus estimate).

    `overlap_px` defaults to the engine's configured tile overlap (EngineConfig.tile_overlap_px).
    """
    if frame.ndim != 2 or min(frame.shape) < 1:
        raise InputError(f"expected a 2-D frame, got shape {frame.shape}")
    if overlap_px is None:
        overlap_px = engine.tile_overlap_px
    height, width = frame.shape
    padded = _pad(np.asarray(frame, dtype=np.float32), _padded_length(height, engine), _padded_length(width, engine))
    tile_px = engine.max_size_px
    if max(padded.shape) > tile_px:
        # Said once per engine and frame shape at INFO (a daemon sees thousands of frames of one shape).
        key = (engine.name, engine.max_size_px, height, width)
        level = logging.DEBUG if key in _TILING_ANNOUNCED else logging.INFO
        _TILING_ANNOUNCED.add(key)
        log.log(
            level,
            kv(
                "tiling",
                engine=engine.name,
                frame=f"{height}x{width}",
                max_size_px=tile_px,
                overlap_px=overlap_px,
                reason="frame larger than the engine's size range",
            ),
        )
    while True:
        overlap = min(overlap_px, (tile_px // 2 - 1) // engine.stride * engine.stride)
        try:
            if max(padded.shape) <= tile_px:
                images, focus = engine.run(padded[None, None])
                image, frame_focus = images[0, 0], FrameFocus(*(float(v) for v in focus[0, :3]))
            else:
                image, frame_focus = _infer_tiled(engine, padded, tile_px, max(overlap, 0))
            break
        except EngineOutOfMemoryError:
            smaller = (tile_px // 2) // engine.stride * engine.stride
            if smaller < engine.min_size_px:
                raise
            log.warning(
                kv(
                    "engine_out_of_memory",
                    engine=engine.name,
                    frame=f"{height}x{width}",
                    tile_px=tile_px,
                    retry_tile_px=smaller,
                )
            )
            tile_px = smaller
    return np.ascontiguousarray(image[:height, :width], dtype=np.float32), frame_focus
