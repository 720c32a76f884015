"""Two-channel time-lapses on the simulated microscope's real Micro-Manager core: nuclei and cytoplasm stains as
channel presets of the config group "Channel" (a filter turret device), the focus loop driven by one channel.

Measured against the simulator's truth on the driving channel's frames: the loop driven by the nuclear channel,
and beside it the same run with the cytoplasm frames pooled into the fit (what the loop did before it knew about
channels: `FocusController(channel=None)`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from support import SMALL_FIELD_SIMULATOR

from acquire_refocus.commands.demo import FocusTruth
from acquire_refocus.config import parse_config
from acquire_refocus.daemon import Daemon
from acquire_refocus.focus import FocusController
from acquire_refocus.hooks.pymmcore_plus import run_sequence
from acquire_refocus.pipeline import FramePipeline
from acquire_refocus.sim.devices import create_simulated_core
from acquire_refocus.storage import FOCUS_LOG, RAW_STORE, read_focus_log

pytestmark = [pytest.mark.timeout(600)]

OPTICS = {"channels": {"Nuclei": {"emission_wavelength_nm": 461}, "Cytoplasm": {"emission_wavelength_nm": 510}}}
STAINS = {"Nuclei": {"stain": "nuclei"}, "Cytoplasm": {"stain": "cytoplasm", "brightness": 1.5}}
THERMAL = {"model": "thermal", "amplitude_um": 8.0, "time_constant_s": 40.0}
CHANNELS = [{"config": "Nuclei", "group": "Channel"}, {"config": "Cytoplasm", "group": "Channel"}]


@pytest.fixture(scope="module")
def shipped_refocuser() -> Any:
    import torch

    from acquire_refocus import Refocuser

    torch.set_num_threads(2)
    return Refocuser.load()


def _config(stains: dict = STAINS, drift: dict = THERMAL, **focus: Any) -> Any:
    return parse_config(
        {
            "optics": OPTICS,
            "simulator": {**SMALL_FIELD_SIMULATOR, "channels": stains, "drift": drift, "time_per_frame_s": 1.0},
            "publishing": {"enabled": False},
            "focus": {
                "mode": "correct",
                "fine_source": "sharpness",
                "window_frames": 3,
                "z_limits_um": [60, 140],
                **focus,
            },
        }
    )


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def run_two_channels(refocuser: Any, channel: str | None, loops: int = 30) -> tuple[FocusTruth, FocusController]:
    """The real core, MDA, pipeline and controller; `channel` None pools every channel's frames into the loop."""
    config = _config()
    core, scope = create_simulated_core(config.optics, config.simulator)
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": loops}, stage_positions=[(0, 0, 100)], channels=CHANNELS, axis_order="tpc"
    )
    controller = FocusController(config.focus, config.optics, channel=channel)
    truth = FocusTruth(scope, config.simulator.time_per_frame_s, {0: 100.0})
    core.mda.events.frameReady.connect(truth.frameReady)
    with FramePipeline(refocuser, [controller]) as pipeline:
        run_sequence(core, sequence, pipeline, controller=controller)
    controller.close()
    return truth, controller


@pytest.mark.slow
def test_the_loop_driven_by_the_nuclear_channel_beside_pooled_channels(shipped_refocuser: Any) -> None:
    driven, controller = run_two_channels(shipped_refocuser, "Nuclei")
    pooled, pooled_controller = run_two_channels(shipped_refocuser, None)
    rms_driven = rms([r["error_um"] for r in driven.of_channel("Nuclei")])
    rms_pooled = rms([r["error_um"] for r in pooled.of_channel("Nuclei")])
    rms_without = rms([r["uncorrected_error_um"] for r in driven.of_channel("Nuclei")])
    print(
        f"\ntwo channels, thermal drift, 30 time points: driven by Nuclei {rms_driven:.2f} um RMS "
        f"({controller.state()['moves']} moves, {controller.sharpness_restarts} restarts); cytoplasm pooled in "
        f"{rms_pooled:.2f} um ({pooled_controller.state()['moves']} moves, {pooled_controller.sharpness_restarts}"
        f" restarts); without correction {rms_without:.2f} um"
    )
    assert controller.other_channel_frames == 30 and controller.sharpness_measured == 30
    assert pooled_controller.other_channel_frames == 0 and pooled_controller.sharpness_measured == 60
    assert rms_driven <= 1.0 < rms_without
    # both channels of a time point were taken at the same Z: the loop's offset applies to every channel
    by_time = {}
    for row in driven.rows:
        by_time.setdefault(row["t_index"], set()).add(round(row["stage_z_um"], 6))
    assert all(len(z) == 1 for z in by_time.values())


@pytest.mark.slow
def test_a_blank_driving_channel_never_moves_the_stage(shipped_refocuser: Any) -> None:
    """The driving channel shows no structure (its stain is 10^-4 as bright), the other channel does: no move."""
    config = _config(
        {"Nuclei": {"stain": "nuclei"}, "Blank": {"stain": "cytoplasm", "brightness": 1e-4}},
        {"model": "linear", "rate_um_per_min": 6.0},
        channel="Blank",
    )
    core, _ = create_simulated_core(config.optics, config.simulator)
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 12},
        stage_positions=[(0, 0, 100)],
        channels=[{"config": "Nuclei", "group": "Channel"}, {"config": "Blank", "group": "Channel"}],
        axis_order="tpc",
    )
    controller = FocusController(config.focus, config.optics, channel="Blank")
    with FramePipeline(shipped_refocuser, [controller]) as pipeline:
        run_sequence(core, sequence, pipeline, controller=controller)
    controller.close()
    assert controller.other_channel_frames == 12
    assert controller.state()["moves"] == 0


@pytest.mark.slow
def test_daemon_saves_and_logs_every_frame_of_both_channels_and_keeps_the_other_stain_raw(
    shipped_refocuser: Any, tmp_path: Path
) -> None:
    """Nothing lost: every frame of both channels in the raw store and the focus log; the cytoplasm channel (510
    nm, outside the shipped model's 415-507 nm) is published and logged raw, status skipped with the reason."""
    import zarr

    config = _config(channel=["GFP", "Nuclei"])
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 4},
        stage_positions=[(0, 0, 100), (60, 40, 100)],
        channels=CHANNELS,
        axis_order="tpc",
    )
    skipped_reasons: list[str] = []

    class Reasons:
        def on_frame(self, result: Any) -> None:
            if result.status == "skipped":
                skipped_reasons.append(result.reason)

        def close(self) -> None:
            pass

    with Daemon(
        config, output_dir=tmp_path, corrector=shipped_refocuser, control=False, extra_sinks=lambda: [Reasons()]
    ) as daemon:
        summary = daemon.run(sequence, tmp_path / "run")
    assert not summary.error
    rows = read_focus_log(tmp_path / "run" / FOCUS_LOG)
    assert len(rows) == 16
    assert sum(r["status"] == "skipped" for r in rows) == 8 == len(skipped_reasons)
    assert all("Cytoplasm emits at 510 nm, outside the model's 415-507 nm" in reason for reason in skipped_reasons)
    assert summary.focus["channel"] == "Nuclei" and summary.focus["other_channel_frames"] == 8
    raw = zarr.open_group(str(tmp_path / "run" / RAW_STORE), mode="r")
    arrays = [a for _, a in raw.members(max_depth=None) if isinstance(a, zarr.Array) and a.shape[-2:] == (256, 256)]
    frames = np.concatenate([np.asarray(a).reshape(-1, 256, 256) for a in arrays])  # one array per position
    assert len(frames) == 16 and (frames.max(axis=(1, 2)) > 0).all()


def test_a_focus_channel_the_sequence_lacks_is_a_config_error(shipped_refocuser: Any) -> None:
    from acquire_refocus.errors import ConfigError

    config = _config(channel="GFP")
    sequence = useq.MDASequence(stage_positions=[(0, 0, 100)], channels=CHANNELS)
    with (
        Daemon(config, corrector=shipped_refocuser, control=False) as daemon,
        pytest.raises(ConfigError, match=r"focus\.channel: none of GFP is a channel of the sequence"),
    ):
        daemon.run(sequence, None)
