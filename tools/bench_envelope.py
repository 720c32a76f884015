"""Per-frame cost of what the Refocuser adds around the network, measured side by side in one run.

    python tools/bench_envelope.py [--sizes 512 2048] [--repeats 20] [--weights W]

ONNX Runtime on one thread. Prints p50 of: the envelope checks alone (model/envelope.py), a Refocuser call with
`engine.physics_fusion: false` (network + checks) and one with the fusion (model/fusion.py), interleaved, and the
ratio of the full call to the network-and-checks call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig
from acquire_refocus.model.envelope import envelope_flags


def p50_ms(call: Callable[[], object], repeats: int) -> float:
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
    plain = Refocuser.load(
        args.weights, engine=EngineConfig(backend="onnxruntime", num_threads=1, physics_fusion=False)
    )
    fused = Refocuser.load(args.weights, engine=EngineConfig(backend="onnxruntime", num_threads=1))
    rng = np.random.default_rng(0)
    for size in args.sizes:
        frame = rng.poisson(50.0, (size, size)).astype(np.uint16) + 100
        frame[size // 4 : size // 2, size // 4 : size // 2] += 400
        plain(frame), fused(frame)  # warm-up
        checks = p50_ms(lambda frame=frame: envelope_flags(frame, 1.0, fused.snr_range), args.repeats)
        rounds = max(3, args.repeats // 4)
        without, with_fusion = [], []
        for _ in range(rounds):  # interleaved, so both see the same machine
            without.append(p50_ms(lambda frame=frame: plain(frame), 1))
            with_fusion.append(p50_ms(lambda frame=frame: fused(frame), 1))
        a, b = float(np.median(without)), float(np.median(with_fusion))
        print(
            f"{size}x{size}: envelope checks {checks:.1f} ms, network + checks {a:.1f} ms, + fusion {b:.1f} ms "
            f"p50 (x{b / a:.2f}; checks {100 * checks / a:.1f} % of the call without fusion)"
        )


if __name__ == "__main__":
    main()
