"""The simulator's PFS-like hardware focus lock with an optics preset: lock alone, lock + offset corrections from the
sharpness at the optics' band, and lock + the preset's own sharpness settings (its `focus:` section).

    python tools/lock_closed_loop.py [--preset configs/optics/60x-1.40-oil.yaml] [--seeds 0 1 2]

The drifts, lock devices and field are those of tests/test_autofocus_lock.py (the stand drifts 8 um, which the lock
removes; the sample 4 um relative to the coverslip; 30 time points of 512 px at one position). Prints, per seed and
setting, the focus error's RMS, mean and sd against the simulator's in-focus plane, the offset moves, and the Z
moves made while the lock held (there must be none).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import useq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_autofocus_lock as lock_test  # noqa: E402 - the test's drifts and lock settings, after sys.path

from acquire_refocus import Refocuser  # noqa: E402
from acquire_refocus.commands.demo import FocusTruth  # noqa: E402
from acquire_refocus.config import AppConfig, load_config, parse_config  # noqa: E402
from acquire_refocus.daemon import Daemon  # noqa: E402

_SHARPNESS_KEYS = ("sharpness_band_um", "sharpness_width_um", "sharpness_range_um", "sharpness_dither_um")


def run(refocuser: Any, preset: AppConfig, mode: str, focus: dict[str, Any], seed: int) -> tuple[list[float], int, int]:
    """(errors per frame, offset moves, Z moves while locked) of one run."""
    config = parse_config(
        {
            "optics": preset.optics.model_dump(mode="json"),
            "simulator": {
                **lock_test.DEMO_FIELD,
                "max_defocus_um": preset.simulator.max_defocus_um,
                "psf_z_step_um": preset.simulator.psf_z_step_um,
                "seed": seed,
                "drift": lock_test.STAND_DRIFT,
                "sample_drift": lock_test.SAMPLE_DRIFT,
                "focus_lock": True,
                "time_per_frame_s": lock_test.TIME_PER_FRAME_S,
            },
            "publishing": {"enabled": False},
            "focus": {"mode": mode, "fine_source": "sharpness", "window_frames": 3, **lock_test.LOCK_FOCUS, **focus},
        }
    )
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": lock_test.LOOPS}, stage_positions=[(0.0, 0.0)])
    with Daemon(config, corrector=refocuser, control=False) as daemon:
        core = daemon.acquisition_core()
        core.setProperty("SimPFS", "State", "On")
        truth = FocusTruth(daemon.scope, lock_test.TIME_PER_FRAME_S, {})
        core.mda.events.frameReady.connect(truth.frameReady)
        summary = daemon.run(sequence, None)
        z_moves = daemon.scope.focus_stage.moves_while_locked
    return [r["error_um"] for r in truth.rows], int(summary.focus["moves"]), int(z_moves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "optics" / "60x-1.40-oil.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    preset = load_config(args.preset)
    calibrated = {key: getattr(preset.focus, key) for key in _SHARPNESS_KEYS}
    refocuser = Refocuser.load()
    settings = (
        ("lock alone", "observe", {}),
        ("lock + sharpness at the optics' band", "correct", {}),
        ("lock + the preset's sharpness settings", "correct", calibrated),
    )
    for seed in args.seeds:
        for name, mode, focus in settings:
            errors, moves, z_moves = run(refocuser, preset, mode, focus, seed)
            rms = math.sqrt(statistics.fmean(e * e for e in errors))
            print(
                f"seed {seed}, {name}: {rms:.2f} um RMS, mean {statistics.fmean(errors):+.2f}, sd "
                f"{statistics.pstdev(errors):.2f} um; {moves} offset moves, {z_moves} Z moves while locked",
                flush=True,
            )


if __name__ == "__main__":
    main()
