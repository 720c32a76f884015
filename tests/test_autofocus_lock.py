"""Hardware focus locks as the loop's actuator (`focus.actuator: autofocus_offset`) on real Micro-Manager cores:
the simulator's PFS-like lock (offset stage device + lock-state property) and DemoCamera's autofocus device.

The simulated lock holds the coverslip, so the stand's drift never defocuses; the sample drifts 4 um relative to
the coverslip over the run, which only the loop, through the lock's offset, can correct. The Z drive must never
be moved while the lock is engaged, and a lost lock stops the corrections."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import useq
from support import SMALL_FIELD_SIMULATOR

from acquire_refocus.commands.demo import FocusTruth
from acquire_refocus.config import FocusConfig, parse_config
from acquire_refocus.daemon import Daemon
from acquire_refocus.focus_lock import CoreAutofocusLock, OffsetDeviceLock, focus_lock_for

pytestmark = [pytest.mark.timeout(600)]

LOOPS = 30
TIME_PER_FRAME_S = 2.0
SAMPLE_DRIFT = {"model": "linear", "rate_um_per_min": 4.0}  # 4 um over the 60 s run
STAND_DRIFT = {"model": "thermal", "amplitude_um": 8.0, "time_constant_s": 40.0}
LOCK_FOCUS = {
    "actuator": "autofocus_offset",
    "lock_offset_device": "SimPFSOffset",
    "lock_status": ["SimPFS", "Status", "Locked"],
    "z_limits_um": [-20, 20],
}


@pytest.fixture(scope="module")
def shipped_refocuser() -> Any:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(2)
    return Refocuser.load()


# The demo's specimen and 512 x 512 frames: in this field the sharpest plane lies near the simulator's "in focus"
# (the nuclei layer's mid-plane); in SMALL_FIELD_SIMULATOR's field it lies 0.7-0.9 um deeper, which an image-based
# loop holds whatever its actuator (README, closed-loop focus).
DEMO_FIELD = {"camera": {"width_px": 512, "height_px": 512}, "focus_z_um": 100.0, "z_limits_um": [50, 150]}


def run_locked(
    refocuser: Any, mode: str, lose_at_t: int | None = None, field: dict | None = None
) -> tuple[FocusTruth, dict, Any, list]:
    config = parse_config(
        {
            "simulator": {
                **(field or SMALL_FIELD_SIMULATOR),
                "drift": STAND_DRIFT,
                "sample_drift": SAMPLE_DRIFT,
                "focus_lock": True,
                "time_per_frame_s": TIME_PER_FRAME_S,
            },
            "publishing": {"enabled": False},
            "focus": {"mode": mode, "fine_source": "sharpness", "window_frames": 3, **LOCK_FOCUS},
        }
    )
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": LOOPS}, stage_positions=[(0.0, 0.0)])
    offsets: list[tuple[int, float]] = []
    with Daemon(config, corrector=refocuser, control=False) as daemon:
        core = daemon.acquisition_core()
        core.setProperty("SimPFS", "State", "On")
        truth = FocusTruth(daemon.scope, TIME_PER_FRAME_S, {})
        stage = daemon.scope.focus_stage

        def watch(image: Any, event: useq.MDAEvent, meta: dict) -> None:
            t_index = event.index.get("t", 0)
            offsets.append((t_index, core.getPosition("SimPFSOffset")))
            if lose_at_t is not None and t_index == lose_at_t:
                stage.focus_lock.lose()

        core.mda.events.frameReady.connect(truth.frameReady)
        core.mda.events.frameReady.connect(watch)
        try:
            summary = daemon.run(sequence, None)
        finally:
            core.mda.events.frameReady.disconnect(truth.frameReady)
            core.mda.events.frameReady.disconnect(watch)
        assert not summary.error
        return truth, summary.focus, stage, offsets


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


@pytest.mark.slow
def test_offset_corrections_hold_focus_against_sample_drift_without_moving_z(shipped_refocuser: Any) -> None:
    truth, focus, stage, offsets = run_locked(shipped_refocuser, "correct", field=DEMO_FIELD)
    lock_only, _, stage_observe, _ = run_locked(shipped_refocuser, "observe", field=DEMO_FIELD)
    with_loop = rms([r["error_um"] for r in truth.rows])
    without = rms([r["error_um"] for r in lock_only.rows])
    print(
        f"\nlock + offset corrections: {with_loop:.2f} um RMS; lock alone: {without:.2f} um "
        f"(stand drift 8 um removed by the lock, sample drift 4 um); offset moves {focus['moves']}"
    )
    assert stage.moves_while_locked == 0 and stage_observe.moves_while_locked == 0
    assert focus["moves"] > 0 and offsets[-1][1] != 0.0
    assert with_loop <= 0.7 < without


@pytest.mark.slow
def test_a_lost_lock_stops_the_corrections(shipped_refocuser: Any, engine_log: pytest.LogCaptureFixture) -> None:
    lose_at = 12
    _, focus, stage, offsets = run_locked(shipped_refocuser, "correct", lose_at_t=lose_at)
    after = {offset for t_index, offset in offsets if t_index > lose_at}
    assert len(after) == 1  # the offset never changed once the lock was lost
    assert focus["lock_lost"] == 1
    assert "event=focus_lock_lost" in engine_log.text
    assert stage.moves_while_locked == 0


def test_democamera_autofocus_device_offsets_through_the_core() -> None:
    """Where the hardware has an autofocus device, the loop uses the core's own calls (DemoCamera's DAutoFocus)."""
    mm_test_adapters = pytest.importorskip("mm_test_adapters")
    from acquire_refocus.hooks.mm_hardware import hardware_core

    adapters = Path(mm_test_adapters.device_adapter_path())
    with hardware_core(adapters / "MMConfig_demo.cfg", adapters) as core:
        assert core.getAutoFocusDevice()
        lock = focus_lock_for(core, FocusConfig(actuator="autofocus_offset"))
        assert isinstance(lock, CoreAutofocusLock)
        lock.set_offset_um(3.5)
        assert core.getAutoFocusOffset() == pytest.approx(3.5)
        assert lock.offset_um() == pytest.approx(3.5)
        core.enableContinuousFocus(True)
        assert lock.locked() == core.isContinuousFocusLocked()


def test_a_lock_the_configuration_lacks_is_a_clear_error() -> None:
    from acquire_refocus.errors import UserError
    from acquire_refocus.sim.devices import create_simulated_core

    config = parse_config({"simulator": {**SMALL_FIELD_SIMULATOR, "focus_lock": True}})
    core, _ = create_simulated_core(config.optics, config.simulator)
    assert isinstance(focus_lock_for(core, FocusConfig(**LOCK_FOCUS)), OffsetDeviceLock)
    half_um_units = focus_lock_for(core, FocusConfig(**LOCK_FOCUS, lock_um_per_unit=0.5))
    half_um_units.set_offset_um(2.0)  # 2 um of focus: 4 units of this offset
    assert core.getPosition("SimPFSOffset") == pytest.approx(4.0) and half_um_units.offset_um() == pytest.approx(2.0)
    with pytest.raises(UserError, match="lock_offset_device 'PFSOffset' is not loaded"):
        focus_lock_for(core, FocusConfig(actuator="autofocus_offset", lock_offset_device="PFSOffset"))
    with pytest.raises(UserError, match="no autofocus device"):
        focus_lock_for(core, FocusConfig(actuator="autofocus_offset"))
