"""Per-frame cost of what the Refocuser adds around the network, measured side by side in one run.

    python tools/bench_envelope.py [--sizes 512 2048] [--repeats 20] [--weights W]

ONNX Runtime on one thread. Prints p50 of: the envelope checks alone (model/envelope.py), a Refocuser call with
`engine.physics_fusion: false` (network + checks), one with the fusion (model/fusion.py, whose noise probe runs the
network twice more on a window; `engine.physics_path: false`), one with the fusion told no network (no probe: the
fusion before the probe), and one through the physics path at its most costly (model/physics_path.py: a share
between 0 and 1, so both the Wiener image and the network's image are fused and mixed), interleaved, and the
ratios to the network-and-checks call (median and quartiles of the ratios within each round).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from acquire_refocus import Refocuser
from acquire_refocus.config import EngineConfig
from acquire_refocus.model.envelope import envelope_flags
from acquire_refocus.model.fusion import SHIPPED_REACH_UM, OpticalFusion
from acquire_refocus.model.physics_path import PhysicsPath, PhysicsPathCalibration, bin_edges_um


class _WithoutProbe(OpticalFusion):
    """The same fusion, never given the network: it skips the noise probe."""

    def __init__(self, fusion: OpticalFusion) -> None:
        self.__dict__.update(fusion.__dict__)

    def __call__(self, raw: np.ndarray, output: np.ndarray, magnitude_um: float, network: object = None) -> np.ndarray:
        return super().__call__(raw, output, magnitude_um)


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
    fused = Refocuser.load(args.weights, engine=EngineConfig(backend="onnxruntime", num_threads=1, physics_path=False))
    assert fused.fusion is not None
    unprobed = Refocuser(fused.loaded, fused.engine, _WithoutProbe(fused.fusion))
    edges = bin_edges_um(SHIPPED_REACH_UM)
    bins = len(edges) + 1
    mixing = PhysicsPathCalibration(
        edges, (10.0,) * bins, (0.75,) * bins, (0.0,) * bins, (0.0,) * bins, (0,) * bins, ""
    )
    both = Refocuser(fused.loaded, fused.engine, fused.fusion, PhysicsPath(fused.fusion, mixing))
    rng = np.random.default_rng(0)
    for size in args.sizes:
        frame = rng.poisson(50.0, (size, size)).astype(np.uint16) + 100
        frame[size // 4 : size // 2, size // 4 : size // 2] += 400
        plain(frame), fused(frame), unprobed(frame), both(frame)  # warm-up
        checks = p50_ms(lambda frame=frame: envelope_flags(frame, 1.0, fused.snr_range), args.repeats)
        rounds = max(3, args.repeats // 4)
        without, with_fusion, without_probe, with_path = [], [], [], []
        for _ in range(rounds):  # interleaved, so all see the same machine
            without.append(p50_ms(lambda frame=frame: plain(frame), 1))
            with_fusion.append(p50_ms(lambda frame=frame: fused(frame), 1))
            without_probe.append(p50_ms(lambda frame=frame: unprobed(frame), 1))
            with_path.append(p50_ms(lambda frame=frame: both(frame), 1))
        a, b, c, d = (float(np.median(times)) for times in (without, with_fusion, without_probe, with_path))
        fusion, unprobed_fusion, path = (ratio(t, without) for t in (with_fusion, without_probe, with_path))
        print(
            f"{size}x{size}: envelope checks {checks:.1f} ms, network + checks {a:.1f} ms, + fusion {b:.1f} ms "
            f"({fusion}), + fusion without its noise probe {c:.1f} ms ({unprobed_fusion}), + physics path mixing "
            f"both {d:.1f} ms ({path}) p50 over {rounds} rounds, ratios per round [quartiles]; checks "
            f"{100 * checks / a:.1f} % of the call without fusion"
        )


def ratio(times_ms: list[float], baseline_ms: list[float]) -> str:
    """Median and quartiles of the per-round ratios to the baseline: the calls of one round ran back to back, so a
    ratio within a round is less noisy than a ratio of medians across rounds."""
    q1, median, q3 = np.percentile(np.asarray(times_ms) / np.asarray(baseline_ms), [25, 50, 75])
    return f"x{median:.2f} [{q1:.2f}-{q3:.2f}]"


if __name__ == "__main__":
    main()
