"""Benchmark of the simulated microscope: time to render one noisy camera frame, per frame size.

Two cases per size: "static" (same stage position: cached specimen spectra and transfer functions, the live-view
steady state) and "z-sweep" (a new stage Z every frame: new transfer functions for most specimen planes).
Run: python tools/bench_sim.py [--sizes 512 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acquire_refocus.config import CameraConfig, OpticsConfig, SimulatorConfig
from acquire_refocus.sim.microscope import SimulatedMicroscope


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def simulator_records(sizes: list[int], repeats: int) -> list[dict]:
    """One benchmark record per (size, case), in the shared benchmark record format."""
    records: list[dict] = []
    device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for size in sizes:
        simulator = SimulatorConfig(camera=CameraConfig(width_px=size, height_px=size))
        start = time.perf_counter()
        scope = SimulatedMicroscope(OpticsConfig(), simulator)
        startup_s = time.perf_counter() - start
        focus = scope.focus_z_um()
        for case in ("static", "z-sweep"):
            scope.render(focus)  # warm: specimen spectra for this window
            times_ms: list[float] = []
            for i in range(repeats):
                z = focus + (0.0 if case == "static" else 0.5 + 0.75 * i)
                start = time.perf_counter()
                scope.render(z)
                times_ms.append((time.perf_counter() - start) * 1e3)
            p50 = statistics.median(times_ms)
            records.append(
                {
                    "kind": "simulator",
                    "engine": "simulator-camera",
                    "precision": "fp32",
                    "device": device,
                    "size": size,
                    "batch": 1,
                    "p50_ms": round(p50, 2),
                    "p99_ms": round(_percentile(times_ms, 99), 2),
                    "fps": round(1000.0 / p50, 2),
                    "case": case,
                    "startup_s": round(startup_s, 2),
                    "psf_bank_from_cache": scope.psf_bank_from_cache,
                }
            )
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[512, 2048],
        help="square frame sizes in pixels",
    )
    parser.add_argument("--repeats", type=int, default=10, help="frames timed per size and case")
    args = parser.parse_args()
    records = simulator_records(args.sizes, args.repeats)
    print(f"{'size':>6} {'case':>8} {'p50_ms':>9} {'p99_ms':>9} {'fps':>8} {'startup_s':>10}")
    for r in records:
        print(
            f"{r['size']:>6} {r['case']:>8} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['fps']:>8.1f} "
            f"{r['startup_s']:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
