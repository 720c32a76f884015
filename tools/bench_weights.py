"""Refocuser calls of several weights files timed side by side, interleaved, in one run.

    python tools/bench_weights.py default runs/image-head/weights.pt [--sizes 512 2048] [--rounds 15]

Each weights file ("default" = the shipped model) is loaded on ONNX Runtime with one thread, as the daemon runs it
(envelope checks and fusion included). Rounds alternate between the files so that load from other programs hits
them alike. Prints the p50 per file and size, and each file's ratio to the first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", help='weights files; "default" is the shipped model')
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    engine = EngineConfig(backend="onnxruntime", num_threads=1)
    refocusers = [Refocuser.load(None if w == "default" else w, engine=engine) for w in args.weights]
    rng = np.random.default_rng(0)
    for size in args.sizes:
        frame = rng.poisson(50.0, (size, size)).astype(np.uint16) + 100
        frame[size // 4 : size // 2, size // 4 : size // 2] += 400
        for refocuser in refocusers:
            refocuser(frame)  # warm-up (and the ONNX export on first use)
        times_ms: list[list[float]] = [[] for _ in refocusers]
        for _ in range(args.rounds):
            for refocuser, times in zip(refocusers, times_ms, strict=True):
                start = time.perf_counter()
                refocuser(frame)
                times.append((time.perf_counter() - start) * 1000.0)
        first = float(np.median(times_ms[0]))
        for name, times in zip(args.weights, times_ms, strict=True):
            p50 = float(np.median(times))
            print(f"{size}x{size} {name}: p50 {p50:.1f} ms (x{p50 / first:.2f} of {args.weights[0]})")


if __name__ == "__main__":
    main()
