"""Time and peak memory of computing a PSF bank, as a first start on new optics does (nothing cached).

The default case is the one that did not scale (issue 18): 100x / 1.45 NA oil, 130 nm pixels, 461 nm emission,
sample index 1.40, a bank of 323 planes of 1115 px (+-16.5 um: +-8 um of defocus plus the specimen's depth). The
bank is computed in a child process run under `/usr/bin/time -v` (its maximum RSS, that of the largest single
process, and the CPU time of all processes) while this script samples the resident memory of the child and all its
worker processes together every 0.2 s (the figure that decides whether a 16 GB PC copes). Run it beside nothing
else for clean timings; on a loaded machine the CPU seconds divided by the cores is what an idle one would take:

    python tools/bench_psf.py                       # the issue's 100x bank, vectorial model
    python tools/bench_psf.py --model scalar        # psfmodels' scalar model, worker processes on all cores
    python tools/bench_psf.py --model scalar --workers 1
    python tools/bench_psf.py --config configs/optics/60x-1.40-oil.yaml --max-defocus-um 13.5 --z-step-um 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_ISSUE_OPTICS = {
    "numerical_aperture": 1.45,
    "magnification": 100.0,
    "immersion_index": 1.515,
    "sample_index": 1.40,
    "emission_wavelength_nm": 461.0,
    "camera_pixel_size_um": 13.0,
}


def _child(args: argparse.Namespace) -> None:
    """Compute the bank into an empty cache folder (so the cache write is included) and print a JSON summary."""
    from acquire_refocus.config import OpticsConfig, load_config
    from acquire_refocus.logs import setup_logging
    from acquire_refocus.sim.psf import load_or_compute_psf_bank

    setup_logging("INFO")
    optics = load_config(args.config).optics if args.config else OpticsConfig(**_ISSUE_OPTICS)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        bank, _ = load_or_compute_psf_bank(
            optics,
            max_defocus_um=args.max_defocus_um,
            z_step_um=args.z_step_um,
            depth_um=args.depth_um,
            cache_dir=Path(cache),
            model=args.model,
            workers=args.workers,
        )
        seconds = time.perf_counter() - start
        cache_mb = sum(p.stat().st_size for p in Path(cache).iterdir()) / 2**20
    print(
        json.dumps(
            {
                "planes": len(bank.defocus_um),
                "size_px": bank.size_px,
                "bank_mb": round(bank.psf_quadrant.nbytes / 2**20),
                "cache_file_mb": round(cache_mb),
                "seconds": round(seconds, 1),
            }
        )
    )


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="take the optics from this config (default: the issue's 100x oil)")
    parser.add_argument("--max-defocus-um", type=float, default=16.48, help="half-range of the bank")
    parser.add_argument("--z-step-um", type=float, default=0.1024, help="plane spacing")
    parser.add_argument("--depth-um", type=float, default=6.5, help="point source depth in the sample")
    parser.add_argument("--model", choices=("vectorial", "scalar"), default="vectorial", help="PSF model")
    parser.add_argument("--workers", type=int, default=None, help="scalar model: worker processes (default: all cores)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", *sys.argv[1:]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"the bank computation failed:\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    largest_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    cpu_s = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", stderr).group(1)) for kind in ("User", "System"))
    result["cpu_seconds_all_processes"] = round(cpu_s, 1)
    result["max_rss_largest_process_mb"] = round(largest_kb / 1024)
    result["peak_rss_all_processes_mb"] = round(peak / 2**20)
    result["cores"] = os.cpu_count()
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
