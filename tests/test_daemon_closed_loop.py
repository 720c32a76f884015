"""Closed-loop focus on the simulated microscope through the real Micro-Manager core: the daemon holds focus
under drift.

The simulator knows the true in-focus Z at every frame's instant (`scope.focus_z_um`), so the focus error is
measured, not estimated: with correction it stays within the depth of field; without (the stage left at its
planned Z, same drift, same instants) it grows. The stage never leaves the soft limits.

The shipped network restores images but its autofocus head cannot yet tell above from below focus (sign correct
for 50% of frames; tools/reports/default-model/README.md), so it reports low confidence and the loop, rightly,
does not move on it. The loop itself (core, MDA, pipeline, controller, stage) is therefore tested with
`SpecifiedAccuracyEstimator`: the shipped network's image, with defocus estimates at the accuracy the autofocus
head is specified for (the simulator's truth plus Gaussian error of 0.5 um). The same test with the shipped
head is a strict xfail: it starts failing, as a reminder to drop the marker, the day a model that meets the
target ships.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
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


class SpecifiedAccuracyEstimator:
    """The shipped Refocuser's image, with the defocus replaced by the simulator's truth for that frame plus
    Gaussian error: an autofocus head at its specified accuracy (MAE <= 0.5 um near focus)."""

    def __init__(self, refocuser: Any, sigma_um: float = 0.5, seed: int = 0) -> None:
        self._refocuser = refocuser
        self.truth: FocusTruth | None = None  # set once the daemon's simulated microscope exists
        self._sigma_um = sigma_um
        self._rng = np.random.default_rng(seed)
        self._calls = 0

    @property
    def engine_name(self) -> str:
        return self._refocuser.engine_name

    def __call__(self, frame: np.ndarray, pixel_size_um: float | None = None) -> Any:
        out = self._refocuser(frame, pixel_size_um)
        index, self._calls = self._calls, self._calls + 1
        deadline = time.monotonic() + 10.0  # the truth row is appended by frameReady, maybe after the hook
        assert self.truth is not None
        while len(self.truth.rows) <= index:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no truth for frame {index}")
            time.sleep(0.002)
        true_defocus_um = self.truth.rows[index]["error_um"]
        estimate_um = true_defocus_um + float(self._rng.normal(0.0, self._sigma_um))
        return dataclasses.replace(out, defocus_um=estimate_um, confidence=0.9)


def run_closed_loop(
    refocuser: Any,
    drift: dict,
    z_limits_um: tuple[float, float],
    specified_accuracy: bool = True,
    window_frames: int = 3,
) -> tuple[FocusTruth, dict]:
    simulator = {**FAST_SIMULATOR, "camera": {"width_px": 256, "height_px": 256, "exposure_ms": 10},
                 "specimen": {"field_size_um": [260, 260], "photons_per_um3": 1500, "nuclei_per_mm2": 3000},
                 "drift": drift, "z_limits_um": [40, 160]}
    config = parse_config({
        "simulator": simulator,
        "publishing": {"enabled": False},
        "focus": {"mode": "correct", "window_frames": window_frames, "min_confidence": 0.5, "dead_band_um": 0.3,
                  "max_step_um": 5.0, "gain": 1.0, "z_limits_um": list(z_limits_um)},
    })
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": LOOPS}, stage_positions=[(0, 0, 100)])
    estimator = SpecifiedAccuracyEstimator(refocuser) if specified_accuracy else None
    with Daemon(config, corrector=estimator or refocuser, control=False) as daemon:
        core = daemon.acquisition_core()
        truth = FocusTruth(daemon.scope, config.simulator.time_per_frame_s, {0: 100.0})
        if estimator is not None:
            estimator.truth = truth
        core.mda.events.frameReady.connect(truth.frameReady)
        summary = daemon.run(sequence, None)
    assert summary.counts()["seen"] == LOOPS and not summary.error
    return truth, summary.focus


@pytest.mark.parametrize(
    ("drift", "window_frames"),
    [
        ({"model": "linear", "rate_um_per_min": 6.0}, 3),  # 0.2 um per frame: 6 um over the run
        ({"model": "thermal", "amplitude_um": 8.0, "time_constant_s": 40.0}, 3),
        # sudden steps: a median over 3 frames holds a 3 um step for two frames, so react on each estimate
        ({"model": "steps", "step_um": 3.0, "step_interval_s": 24.0}, 1),
    ],
    ids=["linear", "thermal", "steps"],
)
def test_closed_loop_holds_focus_under_drift(shipped_refocuser: Any, drift: dict, window_frames: int) -> None:
    truth, focus = run_closed_loop(shipped_refocuser, drift, (50.0, 150.0), window_frames=window_frames)
    corrected = rms([r["error_um"] for r in truth.rows])
    uncorrected = rms([r["uncorrected_error_um"] for r in truth.rows])
    assert corrected <= 1.0, f"RMS focus error {corrected:.2f} um with correction"
    assert uncorrected > 2.0 * corrected and uncorrected > 1.5
    assert focus["moves"] >= 1


@pytest.mark.xfail(
    strict=True,
    reason="the shipped autofocus head cannot tell above from below focus yet (sign correct for 50% of frames)",
)
def test_closed_loop_holds_focus_with_the_shipped_autofocus_head(shipped_refocuser: Any) -> None:
    truth, focus = run_closed_loop(
        shipped_refocuser, {"model": "linear", "rate_um_per_min": 6.0}, (50.0, 150.0), specified_accuracy=False
    )
    assert rms([r["error_um"] for r in truth.rows]) <= 1.0
    assert focus["moves"] >= 1


def test_closed_loop_never_leaves_the_soft_limits(shipped_refocuser: Any) -> None:
    """The focus drifts 6 um up, the soft limit is 3 um above the start: the stage stops at the limit."""
    truth, focus = run_closed_loop(shipped_refocuser, {"model": "linear", "rate_um_per_min": 6.0}, (95.0, 103.0))
    z = [r["stage_z_um"] for r in truth.rows]
    assert all(95.0 <= v <= 103.0 for v in z)
    assert max(z) == pytest.approx(103.0)
    assert focus["clamps"] >= 1
