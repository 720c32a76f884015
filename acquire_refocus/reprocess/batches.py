"""Frames grouped into tasks. A task covers whole write units (the output's chunks, or shards, along t, c, z of one
position; always the whole y, x extent), so no two tasks ever write one chunk and a retried task rewrites only its
own. Batches are numbered in a fixed order from the dataset's shape, its chunks and the batch size, so a rerun
with the same command finds the same batches and can skip those already done."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from acquire_refocus.reprocess.dataset import DatasetInfo


@dataclass(frozen=True)
class Block:
    """One write unit: a position and, per plane axis, the [start, stop) range it covers."""

    position: int
    ranges: tuple[tuple[int, int], ...]

    def frames(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(a, b) for a, b in self.ranges)))

    @property
    def size(self) -> int:
        return math.prod(b - a for a, b in self.ranges)


@dataclass(frozen=True)
class Batch:
    number: int
    blocks: tuple[Block, ...]

    @property
    def size(self) -> int:
        return sum(block.size for block in self.blocks)


def plan_batches(info: DatasetInfo, batch_frames: int) -> list[Batch]:
    """Consecutive write units of one position, grouped until a batch holds at least `batch_frames` frames."""
    batches: list[Batch] = []
    for position in range(len(info.positions)):
        starts = [range(0, n, c) for n, c in zip(info.plane_shape, info.chunks[:-2], strict=True)]
        current: list[Block] = []
        for start in itertools.product(*starts):
            ranges = tuple(
                (s, min(s + c, n)) for s, c, n in zip(start, info.chunks[:-2], info.plane_shape, strict=True)
            )
            current.append(Block(position, ranges))
            if sum(b.size for b in current) >= batch_frames:
                batches.append(Batch(len(batches), tuple(current)))
                current = []
        if current:
            batches.append(Batch(len(batches), tuple(current)))
    return batches
