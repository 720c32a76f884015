"""Closed-loop focus on the simulated microscope through the real Micro-Manager core: the daemon holds focus
under drift.

The simulator knows the true in-focus Z at every frame's instant (`scope.focus_z_um`), so the focus error is
measured, not estimated: with correction it stays within the depth of field; without (the stage left at its
planned Z, same drift, same instants) it grows. The stage never leaves the soft limits.

The shipped network restores images but its autofocus head cannot yet tell above from below focus (sign correct
for 50% of frames; tools/reports/default-model/README.md), so it reports low confidence and the loop, rightly,
does not move on it. The loop itself (core, MDA, pipeline, controller, stage) is therefore tested with
`SpecifiedAccuracyEstimator`: the shipped network's image, with defocus estimates at the accuracy the autofocus
head is specified for (the simulator's truth plus Gaussian error of 0.5 um). With `unsigned=True` only the
magnitude is right and the sign is a coin toss, which is what `focus.sign_source: probe` must cope with. The same
test with the shipped head is a strict xfail: it starts failing, as a reminder to drop the marker, the day a
model that meets the target ships.

With `focus.fine_source: sharpness` the shipped network is used as it is: near focus the loop compares the
sharpness of frames taken at different Z (the stage dithers +-0.3 um), so it needs no defocus estimate there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from support import SMALL_FIELD_SIMULATOR

from acquire_refocus.commands.demo import FocusTruth
from acquire_refocus.config import SpecimenConfig, load_config, parse_config
from acquire_refocus.daemon import Daemon

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

LOOPS = 30
PRESET_60X = Path(__file__).resolve().parents[1] / "configs" / "optics" / "60x-1.40-oil.yaml"


@pytest.fixture(scope="module")
def shipped_refocuser() -> Any:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(2)
    return Refocuser.load()


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def focus_error_rms(truth: FocusTruth) -> tuple[float, float]:
    """RMS focus error with the correction, and what it would have been without (same drift, same instants)."""
    return rms([r["error_um"] for r in truth.rows]), rms([r["uncorrected_error_um"] for r in truth.rows])


LINEAR_DRIFT = {"model": "linear", "rate_um_per_min": 6.0}  # 0.2 um per frame: 6 um over the run
THERMAL_DRIFT = {"model": "thermal", "amplitude_um": 8.0, "time_constant_s": 40.0}
# 512 px frames of the default specimen: the fast-drift loops need the field's full structure
FRAMES_512PX = {
    "camera": {"width_px": 512, "height_px": 512, "exposure_ms": 10},
    "specimen": SpecimenConfig().model_dump(mode="json"),
}


class SpecifiedAccuracyEstimator:
    """The shipped Refocuser's image, with the defocus replaced by the simulator's truth for that frame plus
    Gaussian error: an autofocus head at its specified accuracy (MAE <= 0.5 um near focus). With
    `unsigned=True`, only the magnitude is right: the sign of defocus_um is a coin toss, as with optics whose blur
    looks the same on both sides of focus (what focus.sign_source: probe is for)."""

    def __init__(self, refocuser: Any, sigma_um: float = 0.5, seed: int = 0, unsigned: bool = False) -> None:
        self._refocuser = refocuser
        self._unsigned = unsigned
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
        magnitude_um = abs(estimate_um)
        if self._unsigned:
            estimate_um = magnitude_um * float(self._rng.choice([-1.0, 1.0]))
        return dataclasses.replace(out, defocus_um=estimate_um, defocus_magnitude_um=magnitude_um, confidence=0.9)


def run_closed_loop(
    refocuser: Any,
    drift: dict,
    z_limits_um: tuple[float, float],
    specified_accuracy: bool = True,
    unsigned: bool = False,
    window_frames: int = 3,
    simulator_overrides: dict | None = None,
    z_plan: dict | None = None,
    loops: int = LOOPS,
    optics: dict | None = None,
    **focus_overrides: Any,
) -> tuple[FocusTruth, dict]:
    simulator = {**SMALL_FIELD_SIMULATOR, "drift": drift, "z_limits_um": [40, 160], **(simulator_overrides or {})}
    config = parse_config(
        {
            "optics": optics or {},
            "simulator": simulator,
            "publishing": {"enabled": False},
            "focus": {
                "mode": "correct",
                "window_frames": window_frames,
                "min_confidence": 0.5,
                "dead_band_um": 0.3,
                "max_step_um": 5.0,
                "gain": 1.0,
                "z_limits_um": list(z_limits_um),
                **focus_overrides,
            },
        }
    )
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": loops}, stage_positions=[(0, 0, 100)], z_plan=z_plan, axis_order="tpz"
    )
    estimator = SpecifiedAccuracyEstimator(refocuser, unsigned=unsigned) if specified_accuracy else None
    with Daemon(config, corrector=estimator or refocuser, control=False) as daemon:
        core = daemon.acquisition_core()
        truth = FocusTruth(daemon.scope, config.simulator.time_per_frame_s, {0: 100.0})
        if estimator is not None:
            estimator.truth = truth
        core.mda.events.frameReady.connect(truth.frameReady)
        summary = daemon.run(sequence, None)
    assert summary.counts()["seen"] == len(list(sequence)) and not summary.error
    return truth, summary.focus


@pytest.mark.parametrize(
    ("drift", "window_frames"),
    [
        (LINEAR_DRIFT, 3),
        (THERMAL_DRIFT, 3),
        # sudden steps: a median over 3 frames holds a 3 um step for two frames, so react on each estimate
        ({"model": "steps", "step_um": 3.0, "step_interval_s": 24.0}, 1),
    ],
    ids=["linear", "thermal", "steps"],
)
def test_closed_loop_holds_focus_under_drift(shipped_refocuser: Any, drift: dict, window_frames: int) -> None:
    truth, focus = run_closed_loop(shipped_refocuser, drift, (50.0, 150.0), window_frames=window_frames)
    corrected, uncorrected = focus_error_rms(truth)
    assert corrected <= 1.0, f"RMS focus error {corrected:.2f} um with correction"
    assert uncorrected > 2.0 * corrected and uncorrected > 1.5
    assert focus["moves"] >= 1


@pytest.mark.parametrize(
    "drift",
    [LINEAR_DRIFT, THERMAL_DRIFT],
    ids=["linear", "thermal"],
)
def test_probe_mode_holds_focus_when_the_sign_is_a_coin_toss(shipped_refocuser: Any, drift: dict) -> None:
    """sign_source: probe with an estimator whose sign is random: the side of focus comes from stage moves."""
    truth, focus = run_closed_loop(shipped_refocuser, drift, (50.0, 150.0), unsigned=True, sign_source="probe")
    corrected, uncorrected = focus_error_rms(truth)
    assert corrected <= 1.0, f"RMS focus error {corrected:.2f} um with correction"
    assert uncorrected > 2.0 * corrected
    assert focus["moves"] >= 1


def test_trusting_a_coin_toss_sign_does_not_hold_focus(shipped_refocuser: Any) -> None:
    """The control for the test above: the same estimates with sign_source: network (measured 2.9 um RMS, against
    0.71 um in probe mode and 3.4 um uncorrected)."""
    truth, _ = run_closed_loop(shipped_refocuser, LINEAR_DRIFT, (50.0, 150.0), unsigned=True)
    assert rms([r["error_um"] for r in truth.rows]) > 1.5


def test_probe_mode_with_the_shipped_head_bounds_a_large_drift(shipped_refocuser: Any) -> None:
    """The shipped head's unsigned estimate reads 2-3 um at focus (tools/reports/robust-model/README.md), so it
    needs a dead band above that, and it stops a 12 um drift from running away (measured 3.16 um RMS with 3 moves
    against 6.75 uncorrected; the head shipped before 2026-12-07 session 15: 1.14 um, 4 moves; the one before it
    2.00 um, 20 moves; `python tools/closed_loop_figures.py`). Frames of 512 px of the default specimen: on sparse
    256 px fields its estimate does not follow the blur at all."""
    truth, focus = run_closed_loop(
        shipped_refocuser,
        {"model": "linear", "rate_um_per_min": 12.0},
        (50.0, 150.0),
        specified_accuracy=False,
        simulator_overrides=FRAMES_512PX,
        sign_source="probe",
        dead_band_um=2.5,
        min_confidence=0.0,
    )
    corrected, uncorrected = focus_error_rms(truth)
    assert uncorrected > 5.0
    assert corrected < 0.6 * uncorrected, f"RMS focus error {corrected:.2f} um with, {uncorrected:.2f} without"
    assert focus["moves"] >= 2


@pytest.mark.parametrize(
    "drift",
    [LINEAR_DRIFT, THERMAL_DRIFT],
    ids=["linear", "thermal"],
)
def test_shipped_network_with_sharpness_holds_focus_under_drift(shipped_refocuser: Any, drift: dict) -> None:
    """The shipped network as it is (its estimates fail the 0.5 confidence gate) plus fine_source: sharpness.
    Measured 0.60 / 0.70 um RMS (3.38 / 4.16 um uncorrected)."""
    truth, focus = run_closed_loop(
        shipped_refocuser, drift, (50.0, 150.0), specified_accuracy=False, fine_source="sharpness"
    )
    corrected, uncorrected = focus_error_rms(truth)
    assert corrected <= 1.0, f"RMS focus error {corrected:.2f} um with correction"
    assert uncorrected > 3.0 * corrected
    assert focus["moves"] >= 1


def test_sharpness_feed_forward_keeps_up_with_a_fast_drift(shipped_refocuser: Any) -> None:
    """12 um/min (0.4 um per frame), 512 px frames of the default specimen: the sharpness fit lags the focus by about
    a time point and a half; adding the drift over that lag holds focus (measured 0.71 um RMS), without it the loop
    trails by 1-2 um (1.37 um). Uncorrected: 6.75 um."""
    fast = {"model": "linear", "rate_um_per_min": 12.0}
    with_lead, _ = run_closed_loop(
        shipped_refocuser,
        fast,
        (50.0, 150.0),
        specified_accuracy=False,
        simulator_overrides=FRAMES_512PX,
        fine_source="sharpness",
    )
    without_lead, _ = run_closed_loop(
        shipped_refocuser,
        fast,
        (50.0, 150.0),
        specified_accuracy=False,
        simulator_overrides=FRAMES_512PX,
        fine_source="sharpness",
        sharpness_lead_time_points=0,
    )
    corrected, uncorrected = focus_error_rms(with_lead)
    assert corrected <= 1.0 < focus_error_rms(without_lead)[0], f"{corrected:.2f} um with the feed-forward"
    assert uncorrected > 5.0


def test_shipped_network_with_sharpness_recovers_from_focus_steps(shipped_refocuser: Any) -> None:
    """3 um focus steps every 12 frames. The frame after a step is off by the step whatever the loop does; it
    restarts the sharpness fit, the next (dithered) frame gives the direction, and the frame after is back in
    focus. Measured: ~4 um on the two frames after each step, 0.8 um RMS on the others."""
    truth, _ = run_closed_loop(
        shipped_refocuser,
        {"model": "steps", "step_um": 3.0, "step_interval_s": 24.0},
        (50.0, 150.0),
        specified_accuracy=False,
        fine_source="sharpness",
    )
    uncorrected = [r["uncorrected_error_um"] for r in truth.rows]
    steps = [i for i in range(1, LOOPS) if abs(uncorrected[i] - uncorrected[i - 1]) > 1.0]
    assert len(steps) == 2
    settled = [r["error_um"] for i, r in enumerate(truth.rows) if not any(i in (s, s + 1) for s in steps)]
    assert rms(settled) <= 1.0, f"RMS focus error {rms(settled):.2f} um away from the steps"
    assert max(abs(r["error_um"]) for r in truth.rows) < 5.0


def test_at_60x_the_sharpness_loop_holds_a_plane_in_the_band_calibrate_focus_recommends(
    shipped_refocuser: Any,
) -> None:
    """60x / 1.4 oil (depth of field 0.47 um), thermal drift. The simulated nuclei have no detail at the optics'
    resolution, so in its band (the default) the sharpness is camera noise and the loop cannot see focus; with the
    60x preset's sharpness settings (band 1.0 um, width, range and dither from calibrate-focus on them,
    tools/reports/presets/README.md) it follows the drift. Errors are against the simulator's mid-plane of the
    nuclei layer, which need not be the field's sharpest plane: the test asks that the plane held stays put."""
    preset = load_config(PRESET_60X)
    run_60x = functools.partial(
        run_closed_loop,
        shipped_refocuser,
        THERMAL_DRIFT,
        (50.0, 150.0),
        specified_accuracy=False,
        simulator_overrides={
            "max_defocus_um": preset.simulator.max_defocus_um,
            "psf_z_step_um": preset.simulator.psf_z_step_um,
        },
        optics=preset.optics.model_dump(mode="json"),
        fine_source="sharpness",
    )
    default_band, _ = run_60x()
    sharpness_keys = ("sharpness_band_um", "sharpness_width_um", "sharpness_range_um", "sharpness_dither_um")
    calibrated, focus = run_60x(**{key: getattr(preset.focus, key) for key in sharpness_keys})
    corrected, uncorrected = focus_error_rms(calibrated)
    settled = [r["error_um"] for r in calibrated.rows[LOOPS // 3 :]]
    # measured: the default band 4.17 um RMS; calibrated 1.95 um RMS, settled sd 0.38 um around +2.14 um (this
    # field's sharpest plane), 12 moves; uncorrected 4.16 um
    assert focus_error_rms(default_band)[0] > 0.8 * uncorrected
    assert statistics.pstdev(settled) < 0.5
    assert corrected < 0.5 * uncorrected
    assert focus["moves"] >= 5


def stack_centre_errors(truth: FocusTruth) -> tuple[list[float], list[float]]:
    """Per time point, the focus error of the z-stack's centre (mean over its planes), with and without correction."""
    by_t: dict[int, list[dict]] = {}
    for row in truth.rows:
        by_t.setdefault(int(row["t_index"]), []).append(row)
    stacks = [by_t[t] for t in sorted(by_t)]
    return (
        [sum(r["error_um"] for r in s) / len(s) for s in stacks],
        [sum(r["uncorrected_error_um"] for r in s) / len(s) for s in stacks],
    )


def test_sharpness_with_z_stacks_recovers_from_a_step_in_one_time_point(shipped_refocuser: Any) -> None:
    """3-plane z-stacks (+-1.5 um): the latest stack's planes give the fit both sides of focus, so the loop needs
    no dither and a step is corrected at the next time point. The time point during which a step happens is off
    by the step whatever the loop does. Measured: 3.4 / 3.8 um on those, 0.4-0.9 um on the others (this field's
    sharpest plane lies 0.9 um deeper than the simulator's mid-plane focus). The restart of the drift rate after a
    jump, which keeps the loop from overshooting the sharpest plane, is tested in test_focus.py."""
    truth, focus = run_closed_loop(
        shipped_refocuser,
        {"model": "steps", "step_um": 3.0, "step_interval_s": 24.0},
        (50.0, 150.0),
        specified_accuracy=False,
        fine_source="sharpness",
        z_plan={"range": 3.0, "step": 1.5},
        loops=10,
    )
    corrected, uncorrected = stack_centre_errors(truth)
    steps = [t for t in range(1, len(uncorrected)) if abs(uncorrected[t] - uncorrected[t - 1]) > 1.0]
    assert len(steps) == 2
    after = [corrected[t] for t in range(1, len(corrected)) if t not in steps]
    assert max(abs(e) for e in after) <= 1.0, f"stack-centre errors {[round(e, 2) for e in corrected]}"
    centres = [statistics.fmean(r["stage_z_um"] for r in truth.rows if r["t_index"] == t) for t in range(10)]
    changes = sum(abs(b - a) > 1e-6 for a, b in itertools.pairwise(centres))
    assert changes <= focus["moves"], "the stack centre moved without a move of the loop: a dither"
    assert corrected[0] == pytest.approx(uncorrected[0])  # the first stack too: the loop knows the z-plan
    assert focus["moves_by_source"] == {"sharpness": focus["moves"]}


@pytest.mark.xfail(
    strict=True,
    reason="the shipped autofocus head cannot tell above from below focus yet (sign correct for 50% of frames)",
)
def test_closed_loop_holds_focus_with_the_shipped_autofocus_head(shipped_refocuser: Any) -> None:
    truth, focus = run_closed_loop(shipped_refocuser, LINEAR_DRIFT, (50.0, 150.0), specified_accuracy=False)
    assert rms([r["error_um"] for r in truth.rows]) <= 1.0
    assert focus["moves"] >= 1


def test_closed_loop_never_leaves_the_soft_limits(shipped_refocuser: Any) -> None:
    """The focus drifts 6 um up, the soft limit is 3 um above the start: the stage stops at the limit."""
    truth, focus = run_closed_loop(shipped_refocuser, LINEAR_DRIFT, (95.0, 103.0))
    z = [r["stage_z_um"] for r in truth.rows]
    assert all(95.0 <= v <= 103.0 for v in z)
    assert max(z) == pytest.approx(103.0)
    assert focus["clamps"] >= 1
