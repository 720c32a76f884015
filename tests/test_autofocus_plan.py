"""useq `autofocus_plan` through the project's software autofocus, on the simulated microscope's real
Micro-Manager core (pymmcore-plus `UniMMCore`, its MDA engine): autofocus at every position, then a 5-plane
z-stack relative to what it found, starting up to 15 um from focus. Measured against the simulator's truth and
against a plain sweep of the same range and step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from support import SMALL_FIELD_SIMULATOR

from acquire_refocus.autofocus import FocusDrive, SoftwareAutofocus
from acquire_refocus.commands.demo import FocusTruth
from acquire_refocus.config import parse_config
from acquire_refocus.daemon import Daemon
from acquire_refocus.storage import FOCUS_LOG, read_focus_log

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

STARTS_UM = (100.0 + 15.0, 100.0 - 12.0, 100.0 + 6.0)  # the stage positions' planned Z; in focus at 100 um
POSITIONS_XY_UM = ((0.0, 0.0), (60.0, -40.0), (-70.0, 50.0))


@pytest.fixture(scope="module")
def shipped_refocuser() -> Any:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(2)
    return Refocuser.load()


def _config(**focus: Any) -> Any:
    return parse_config(
        {
            "simulator": {**SMALL_FIELD_SIMULATOR, "z_limits_um": [40, 160], "time_per_frame_s": 0.0},
            "publishing": {"enabled": False},
            "focus": {"mode": "observe", "z_limits_um": [60, 140], "fine_source": "sharpness", **focus},
        }
    )


def _sequence() -> useq.MDASequence:
    return useq.MDASequence(
        stage_positions=[(x, y, z) for (x, y), z in zip(POSITIONS_XY_UM, STARTS_UM, strict=True)],
        z_plan={"range": 2.0, "step": 0.5},  # 5 planes, relative to the focus found
        autofocus_plan={"autofocus_device_name": "acquire-refocus", "axes": ("p",)},
        axis_order="pz",
    )


def test_autofocus_plan_finds_focus_before_each_stack_with_fewer_frames_than_a_sweep(
    shipped_refocuser: Any, tmp_path: Path
) -> None:
    config = _config()
    with Daemon(config, output_dir=tmp_path, corrector=shipped_refocuser, control=False) as daemon:
        core = daemon.acquisition_core()
        truth = FocusTruth(daemon.scope, 0.0, {})
        core.mda.events.frameReady.connect(truth.frameReady)
        try:
            summary = daemon.run(_sequence(), tmp_path / "run")
        finally:
            core.mda.events.frameReady.disconnect(truth.frameReady)
    assert not summary.error
    # nothing lost: every frame of the stacks is in the focus log (the sweep's frames are not part of the data)
    rows = read_focus_log(tmp_path / "run" / FOCUS_LOG)
    assert len(rows) == len(truth.rows) == 15
    centres = [
        r
        for r in truth.rows
        if r["t_index"] == 0
        and abs(r["stage_z_um"] - np.mean([q["stage_z_um"] for q in truth.rows if q["p"] == r["p"]])) < 1e-6
    ]
    assert len(centres) == 3
    errors = [r["error_um"] for r in centres]
    rms = math.sqrt(float(np.mean(np.square(errors))))
    plots = sorted((tmp_path / "run" / "autofocus").glob("*.png"))
    assert len(plots) == 3
    print(
        f"\nsoftware autofocus, 3 positions starting {[s - 100 for s in STARTS_UM]} um off: centre-plane "
        f"errors {[round(e, 2) for e in errors]} um, RMS {rms:.2f} um"
    )
    assert rms <= 0.5


def test_seeded_autofocus_uses_fewer_frames_than_a_plain_sweep_for_the_same_error(
    shipped_refocuser: Any,
) -> None:
    """The same search on the core directly: the seeded run against a plain sweep of the same range and step."""
    from acquire_refocus.sim.devices import create_simulated_core

    config = _config()
    core, scope = create_simulated_core(config.optics, config.simulator)
    af = SoftwareAutofocus.for_config(
        config.focus, config.optics, lambda f, px: shipped_refocuser(f, px).defocus_magnitude_um
    )
    drive = FocusDrive(core)
    seeded, plain = [], []
    for (x, y), start in zip(POSITIONS_XY_UM, STARTS_UM, strict=True):
        core.setXYPosition(x, y)
        focus_z = scope.focus_z_um((x, y), 0.0)
        result = af.run(drive, start)
        sweep = af.plain_sweep(drive, start)
        seeded.append((result.frames, result.focus_z_um - focus_z))
        plain.append((sweep.frames, sweep.focus_z_um - focus_z))
    print(
        f"\nseeded: (frames, error um) {[(n, round(e, 2)) for n, e in seeded]}; "
        f"plain sweep: {[(n, round(e, 2)) for n, e in plain]}"
    )
    assert all(n_seeded < n_plain for (n_seeded, _), (n_plain, _) in zip(seeded, plain, strict=True))
    assert math.sqrt(np.mean([e**2 for _, e in seeded])) <= 0.5


def test_autofocus_on_an_empty_field_leaves_the_stage_where_it_was() -> None:
    """No structure, no peak: the stage goes back to the start Z and the run says why."""
    from acquire_refocus.sim.devices import create_simulated_core

    config = parse_config(
        {"simulator": {**SMALL_FIELD_SIMULATOR, "specimen": {**SMALL_FIELD_SIMULATOR["specimen"], "nuclei_per_mm2": 0}}}
    )
    core, _ = create_simulated_core(config.optics, config.simulator)
    af = SoftwareAutofocus.for_config(config.focus, config.optics)
    result = af.run(FocusDrive(core), 103.0)
    assert not result.succeeded and "no sharpness peak" in result.reason
    assert core.getZPosition() == pytest.approx(103.0)


def test_calibrate_focus_plots_the_focus_curve(small_field_scope: Any, tmp_path: Path, restore_logging: None) -> None:
    import tifffile

    from acquire_refocus.cli import main

    defocus_um = np.arange(-4.0, 4.01, 0.5)
    frames, _ = small_field_scope.render_stack(defocus_um, rng=np.random.default_rng(0))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, frames)
    plot = tmp_path / "curve.png"
    assert main(["calibrate-focus", str(stack), "--z-step-um", "0.5", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
