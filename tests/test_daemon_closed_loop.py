"""Closed-loop focus on the simulated microscope with the shipped network: the daemon holds focus under drift.

The simulator knows the true in-focus Z at every frame's instant (`scope.focus_z_um`), so the focus error is
measured, not estimated: with correction it stays within the depth of field; without (the stage left at its
planned Z, same drift, same instants) it grows. The stage never leaves the soft limits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import useq

from conftest import FAST_SIMULATOR
from acquire_refocus.commands.demo import FocusTruth
from acquire_refocus.config import parse_config
from acquire_refocus.daemon import Daemon

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

LOOPS = 30


@pytest.fixture(scope="module")
def shipped_refocuser() -> Any:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(2)
    return Refocuser.load()


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def run_closed_loop(refocuser: Any, drift: dict, z_limits_um: tuple[float, float]) -> tuple[FocusTruth, dict]:
    simulator = {**FAST_SIMULATOR, "camera": {"width_px": 256, "height_px": 256, "exposure_ms": 10},
                 "specimen": {"field_size_um": [260, 260], "photons_per_um3": 1500, "nuclei_per_mm2": 3000},
                 "drift": drift, "z_limits_um": [40, 160]}
    config = parse_config({
        "simulator": simulator,
        "publishing": {"enabled": False},
        "focus": {"mode": "correct", "window_frames": 3, "min_confidence": 0.5, "dead_band_um": 0.3,
                  "max_step_um": 5.0, "gain": 1.0, "z_limits_um": list(z_limits_um)},
    })
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": LOOPS}, stage_positions=[(0, 0, 100)])
    with Daemon(config, corrector=refocuser, control=False) as daemon:
        core = daemon.acquisition_core()
        truth = FocusTruth(daemon.scope, config.simulator.time_per_frame_s, {0: 100.0})
        core.mda.events.frameReady.connect(truth.frameReady)
        summary = daemon.run(sequence, None)
    assert summary.counts()["seen"] == LOOPS and not summary.error
    return truth, summary.focus


@pytest.mark.parametrize(
    "drift",
    [
        {"model": "linear", "rate_um_per_min": 6.0},  # 0.2 um per frame: 6 um over the run
        {"model": "thermal", "amplitude_um": 8.0, "time_constant_s": 40.0},
        {"model": "steps", "step_um": 3.0, "step_interval_s": 24.0},
    ],
    ids=lambda d: d["model"],
)
def test_closed_loop_holds_focus_under_drift(shipped_refocuser: Any, drift: dict) -> None:
    truth, focus = run_closed_loop(shipped_refocuser, drift, (50.0, 150.0))
    corrected = rms([r["error_um"] for r in truth.rows])
    uncorrected = rms([r["uncorrected_error_um"] for r in truth.rows])
    assert corrected <= 1.0, f"RMS focus error {corrected:.2f} um with correction"
    assert uncorrected > 2.0 * corrected and uncorrected > 1.5
    assert focus["moves"] >= 1


def test_closed_loop_never_leaves_the_soft_limits(shipped_refocuser: Any) -> None:
    """The focus drifts 6 um up, the soft limit is 3 um above the start: the stage stops at the limit."""
    truth, focus = run_closed_loop(shipped_refocuser, {"model": "linear", "rate_um_per_min": 6.0}, (95.0, 103.0))
    z = [r["stage_z_um"] for r in truth.rows]
    assert all(95.0 <= v <= 103.0 for v in z)
    assert max(z) == pytest.approx(103.0)
    assert focus["clamps"] >= 1
