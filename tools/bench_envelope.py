"""Cost of the envelope checks (model/envelope.py) beside the network, per frame, measured in one run.

    python tools/bench_envelope.py [--sizes 512 2048] [--repeats 20] [--weights W]

Prints p50 of `envelope_flags` alone and of a whole `Refocuser` call (ONNX Runtime, which runs the checks), so
the share of the checks in the per-frame cost is a ratio measured side by side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig
from acquire_refocus.model.envelope import envelope_flags


def p50_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    refocuser = Refocuser.load(args.weights, engine=EngineConfig(backend="onnxruntime", num_threads=1))
    rng = np.random.default_rng(0)
    for size in args.sizes:
        frame = rng.poisson(50.0, (size, size)).astype(np.uint16) + 100
        frame[size // 4 : size // 2, size // 4 : size // 2] += 400
        refocuser(frame)  # warm-up
        checks = p50_ms(lambda frame=frame: envelope_flags(frame, 1.0, refocuser.snr_range), args.repeats)
        whole = p50_ms(lambda frame=frame: refocuser(frame), max(3, args.repeats // 4))
        print(f"{size}x{size}: envelope checks {checks:.2f} ms p50, whole Refocuser call {whole:.1f} ms p50 "
              f"({100 * checks / whole:.1f} %)")


if __name__ == "__main__":
    main()
