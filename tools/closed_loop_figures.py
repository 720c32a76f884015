"""The closed-loop figures of a model's own estimates, as the shipped-model tests run them, for any weights.

    python tools/closed_loop_figures.py [--weights W]

Runs the loops of tests/test_daemon_closed_loop.py that use the network's own output (no specified-accuracy
estimator): `sign_source: probe` with a 2.5 um dead band against a 12 um/min drift on 512 px frames of the default
specimen, and `fine_source: sharpness` against the linear (6 um/min) and thermal (8 um, 40 s) drifts. Prints each
loop's RMS focus error with and without correction and the moves made, so a candidate model can be compared with
the shipped one before it replaces it (the tests only check bounds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_daemon_closed_loop as loop_test  # noqa: E402 - the tests' loops and drifts, after sys.path

from acquire_refocus import Refocuser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: the shipped model)")
    args = parser.parse_args(argv)
    refocuser = Refocuser.load(args.weights)
    loops = {
        "probe, dead band 2.5 um, 512 px, linear 12 um/min": dict(
            drift={"model": "linear", "rate_um_per_min": 12.0},
            simulator_overrides=loop_test.FRAMES_512PX,
            sign_source="probe",
            dead_band_um=2.5,
            min_confidence=0.0,
        ),
        "sharpness, linear 6 um/min": dict(drift=loop_test.LINEAR_DRIFT, fine_source="sharpness"),
        "sharpness, thermal 8 um, 40 s": dict(drift=loop_test.THERMAL_DRIFT, fine_source="sharpness"),
    }
    print(f"{args.weights or 'shipped model'}")
    for name, settings in loops.items():
        drift = settings.pop("drift")
        truth, focus = loop_test.run_closed_loop(refocuser, drift, (50.0, 150.0), specified_accuracy=False, **settings)
        corrected, uncorrected = loop_test.focus_error_rms(truth)
        print(f"{name}: {corrected:.2f} um RMS with correction, {uncorrected:.2f} without, {focus['moves']} moves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
