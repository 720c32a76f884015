"""What computing each PSF plane at a narrower lateral window would buy, against the shipped full-width bank.

psfmodels computes every pixel of a plane independently of the window size, so a plane computed at a narrower
window is the full-width plane cropped; renormalised to unit sum, it differs from the shipped one by the energy the
shipped plane has outside the window. This script computes, in one run and each in its own child process (so its
CPU time and peak memory are its own):

- ``full``: the shipped computation (`compute_psf_bank`, every plane at the width of the largest defocus);
- ``geometric``: every chunk at the width its own largest |defocus| needs for the geometric blur
  (`psf_size_px` at that |defocus|), chunks grouped by |defocus|;
- ``energy-<bound>``: every plane at the narrowest window outside which the full-width plane has at most that
  fraction of its energy (known here only because the full bank was computed first: a real build would need a
  rule that predicts it).

and reports wall seconds, CPU seconds of the process and its worker processes (`resource.getrusage`), the peak
resident memory of the process and of its largest worker (``ru_maxrss``), and, per window rule, the energy the
full-width planes have outside the windows (max and mean over planes). The machine's load average is printed: on a
shared machine CPU seconds are the robust figure.

    python tools/bench_psf_window.py                 # the issue-18 100x / 1.45 oil bank, 323 planes of 1115 px
    python tools/bench_psf_window.py --max-defocus-um 2 --z-step-um 0.25 --depth-um 3    # a quick check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from acquire_refocus.config import OpticsConfig
    from acquire_refocus.sim.psf import PsfParameters


def _issue_optics() -> OpticsConfig:
    """100x / 1.45 NA oil, 130 nm pixels, 461 nm emission, into a sample of index 1.40 (issue 18)."""
    from acquire_refocus.config import OpticsConfig

    return OpticsConfig(
        numerical_aperture=1.45,
        magnification=100.0,
        immersion_index=1.515,
        sample_index=1.40,
        emission_wavelength_nm=461.0,
        camera_pixel_size_um=13.0,
    )


def _usage() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_seconds": round(own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime, 1),
        "max_rss_process_mb": round(own.ru_maxrss / 1024),
        "max_rss_largest_worker_mb": round(workers.ru_maxrss / 1024),
    }


def _window_planes(
    z_um: npt.NDArray[np.float64], half_px: int, depth_um: float, kwargs: PsfParameters
) -> npt.NDArray[np.float32]:
    """Quadrants [len(z_um), half_px + 1, half_px + 1] of planes computed at width 2 * half_px + 1, unit sum."""
    from acquire_refocus.sim.psf import make_psf_planes

    nx = 2 * half_px + 1
    planes = make_psf_planes(z_um, nx, depth_um, kwargs, "vectorial")
    planes /= planes.sum(axis=(1, 2), keepdims=True)
    return planes[:, half_px:, half_px:].astype(np.float32)


def _child_windowed(args: argparse.Namespace, half_px: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """The bank with plane i computed at half-width half_px[i] (chunks of planes of equal width), embedded centred
    in the full-size quadrants."""
    from acquire_refocus.sim.psf import available_cores, best_focus_z, planes_per_chunk, psf_parameters

    optics = _issue_optics()
    kwargs = psf_parameters(optics, optics.pixel_size_um)
    count = round(args.max_defocus_um / args.z_step_um)
    defocus_um = np.arange(-count, count + 1, dtype=np.float64) * args.z_step_um
    z_best = best_focus_z(args.depth_um, kwargs, "vectorial")
    best_focus_z(args.depth_um + 2.0, kwargs, "vectorial")  # the shipped bank's focal-shift scan, for equal work
    workers = args.workers or available_cores()
    chunks: list[npt.NDArray[np.int64]] = []
    for half in np.unique(half_px):  # planes of one window together (+d and -d share the geometric one)
        same = np.flatnonzero(half_px == half)
        step = planes_per_chunk(2 * int(half) + 1, len(half_px), workers)
        chunks.extend(same[start : start + step] for start in range(0, len(same), step))
    full = int(half_px.max())
    out = np.zeros((len(defocus_um), full + 1, full + 1), dtype=np.float32)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {
            pool.submit(
                _window_planes, z_best + defocus_um[chunk], int(half_px[chunk[0]]), args.depth_um, kwargs
            ): chunk
            for chunk in chunks
        }
        for future in as_completed(futures):
            chunk = futures.pop(future)
            block = future.result()
            out[chunk, : block.shape[1], : block.shape[2]] = block
    return out


def _child(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.variant == "full":
        from acquire_refocus.sim.psf import compute_psf_bank

        bank = compute_psf_bank(
            _issue_optics(),
            max_defocus_um=args.max_defocus_um,
            z_step_um=args.z_step_um,
            depth_um=args.depth_um,
            workers=args.workers,
        )
        quadrants = bank.psf_quadrant
    else:
        quadrants = _child_windowed(args, np.load(args.half_px))
    seconds = time.perf_counter() - start
    np.save(args.out, quadrants)
    print(json.dumps({"wall_seconds": round(seconds, 1), **_usage()}))


def _folded(quadrant: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Each pixel of a quadrant weighted by the number of plane pixels it stands for (so it sums to the plane)."""
    folded = quadrant.astype(np.float64)
    folded[1:, :] *= 2.0
    folded[:, 1:] *= 2.0
    return folded


def _energy_outside(quadrant: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Fraction of the plane's energy outside the centred square of half-width h, for h = 0 ... r."""
    cumulative = np.cumsum(np.cumsum(_folded(quadrant), axis=0), axis=1)
    inside = np.diagonal(cumulative)
    return np.asarray(1.0 - inside / inside[-1], dtype=np.float64)


def _run(args: argparse.Namespace, variant: str, work: Path, half_px: npt.NDArray[np.int64] | None) -> dict[str, float]:
    out = work / f"{variant}.npy"
    command = [sys.executable, __file__, "--child", "--variant", variant, "--out", str(out)]
    command += ["--max-defocus-um", str(args.max_defocus_um), "--z-step-um", str(args.z_step_um)]
    command += ["--depth-um", str(args.depth_um)]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if half_px is not None:
        np.save(work / f"{variant}-half.npy", half_px)
        command += ["--half-px", str(work / f"{variant}-half.npy")]
    load_before = os.getloadavg()[0]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr[-4000:]}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    figures["load_average_1min"] = round((load_before + os.getloadavg()[0]) / 2, 1)
    print(variant, json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-defocus-um", type=float, default=16.48, help="half-range of the bank")
    parser.add_argument("--z-step-um", type=float, default=0.1024, help="plane spacing")
    parser.add_argument("--depth-um", type=float, default=6.5, help="point source depth in the sample")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--energy-bounds", type=float, nargs="*", default=[0.01, 0.05], help="window rules")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--half-px", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    from acquire_refocus.sim.psf import psf_size_px

    optics = _issue_optics()
    count = round(args.max_defocus_um / args.z_step_um)
    defocus_um = np.arange(-count, count + 1, dtype=np.float64) * args.z_step_um
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        full_figures = _run(args, "full", work, None)
        full = np.load(work / "full.npy", mmap_mode="r")
        outside = np.stack([_energy_outside(full[i]) for i in range(len(full))])  # [planes, r + 1]
        rows.append(("full (shipped)", full_figures, full.shape[-1] - 1, 0.0, 0.0))
        rules = {
            "geometric": np.array(
                [psf_size_px(optics, abs(d), optics.pixel_size_um) // 2 for d in defocus_um], dtype=np.int64
            )
        }
        for bound in args.energy_bounds:
            rules[f"energy-{bound:g}"] = np.argmax(outside <= bound, axis=1).astype(np.int64)
        for name, half_px in rules.items():
            half_px = np.minimum(half_px, full.shape[-1] - 1)
            figures = _run(args, name, work, half_px)
            windowed = np.load(work / f"{name}.npy")
            lost = outside[np.arange(len(full)), half_px]
            # inside its window a windowed plane is the full-width plane renormalised: check it
            for i in range(len(full)):
                h = int(half_px[i]) + 1
                expected = full[i, :h, :h] / (1.0 - lost[i])
                assert np.allclose(windowed[i, :h, :h], expected, rtol=1e-5, atol=1e-7 * float(expected.max()))
            rows.append(
                (name, figures, int(np.sqrt(np.mean(half_px.astype(np.float64) ** 2))), lost.max(), lost.mean())
            )
    print(f"\n{len(defocus_um)} planes, full width {2 * (full.shape[-1] - 1) + 1} px, {os.cpu_count()} cores")
    print(
        "| windows | wall s | CPU s (all processes) | peak RSS process / largest worker MB | rms half-width px "
        "| energy outside, max / mean over planes | load |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, figures, rms_px, worst, mean in rows:
        print(
            f"| {name} | {figures['wall_seconds']} | {figures['cpu_seconds']} | {figures['max_rss_process_mb']} / "
            f"{figures['max_rss_largest_worker_mb']} | {rms_px} | {worst:.2%} / {mean:.2%} | "
            f"{figures['load_average_1min']} |"
        )


if __name__ == "__main__":
    main()
