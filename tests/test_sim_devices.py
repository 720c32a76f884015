"""The simulated microscope behind a real Micro-Manager core (pymmcore-plus UniMMCore) and its MDA runner.

Camera errors inside the core's MDA engine are logged and swallowed, so every acquisition test counts frames.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import useq
from pymmcore_plus.experimental.unicore import UniMMCore

from acquire_refocus.config import AppConfig, OpticsConfig, parse_config
from acquire_refocus.errors import UserError
from acquire_refocus.sharpness import BandPassSharpness
from acquire_refocus.sim.devices import ClockedMicroscope, SimClock, StageLimitError, create_simulated_core
from acquire_refocus.sim.microscope import SimulatedMicroscope

FOCUS_Z_UM = 100.0
TIME_PER_FRAME_S = 2.0


@pytest.fixture(scope="module")
def config() -> AppConfig:
    return parse_config(
        {
            "simulator": {
                "camera": {"width_px": 128, "height_px": 96, "exposure_ms": 10},
                # small, bright and dense, so a 128x96 frame always holds well-lit nuclei (and set-up is quick)
                "specimen": {"field_size_um": [160, 160], "photons_per_um3": 1500, "nuclei_per_mm2": 4000},
                "focus_z_um": FOCUS_Z_UM,
                "z_limits_um": [50, 150],
                "time_per_frame_s": TIME_PER_FRAME_S,
                "drift": {"model": "none"},
            }
        }
    )


@pytest.fixture(scope="module")
def shared(config: AppConfig) -> Iterator[tuple[UniMMCore, ClockedMicroscope]]:
    core, scope = create_simulated_core(config.optics, config.simulator)
    yield core, scope
    core.unloadAllDevices()


@pytest.fixture
def sim(shared: tuple[UniMMCore, ClockedMicroscope]) -> Iterator[tuple[UniMMCore, ClockedMicroscope]]:
    """The shared core (building the microscope takes seconds), back at focus and the origin for every test."""
    core, scope = shared
    core.setPosition(FOCUS_Z_UM)
    core.setXYPosition(0.0, 0.0)
    core.setExposure(10.0)
    yield core, scope
    core.mda.events.frameReady.disconnect()


def _sharpness(image: np.ndarray) -> float:
    """The closed loop's own focus measure (band-pass power / mean^2): large for crisp nuclei, small for blur."""
    return BandPassSharpness.for_optics(OpticsConfig())(image)


def _record(core: UniMMCore) -> list[tuple[np.ndarray, useq.MDAEvent, dict]]:
    frames: list[tuple[np.ndarray, useq.MDAEvent, dict]] = []
    core.mda.events.frameReady.connect(lambda img, event, meta: frames.append((img.copy(), event, dict(meta))))
    return frames


def test_core_is_configured_like_a_microscope(sim: tuple[UniMMCore, ClockedMicroscope], config: AppConfig) -> None:
    core, scope = sim
    assert core.getCameraDevice() == "SimCamera"
    assert core.getFocusDevice() == "SimZ"
    assert core.getXYStageDevice() == "SimXY"
    assert not core.getAutoShutter()
    assert core.getPixelSizeUm() == pytest.approx(config.optics.pixel_size_um)
    assert scope.pixel_size_um == pytest.approx(config.optics.pixel_size_um)
    assert (core.getImageHeight(), core.getImageWidth()) == (96, 128) == scope.frame_shape
    assert core.getImageBitDepth() == 16
    assert core.getPosition() == FOCUS_Z_UM and core.getXYPosition() == (0.0, 0.0)
    assert core.getExposure() == 10.0
    core.setExposure(25.0)
    assert core.getExposure() == 25.0
    core.snapImage()
    image = core.getImage()
    assert image.shape == (96, 128) and image.dtype == np.uint16 and image.std() > 0


def test_snap_in_focus_is_sharper_than_10_um_away(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, scope = sim
    core.snapImage()
    in_focus = core.getImage().copy()
    core.setPosition(FOCUS_Z_UM + 10.0)
    core.snapImage()
    above = core.getImage().copy()
    core.setPosition(FOCUS_Z_UM - 10.0)
    core.snapImage()
    below = core.getImage().copy()
    assert _sharpness(in_focus) > 2.0 * _sharpness(above)
    assert _sharpness(in_focus) > 2.0 * _sharpness(below)
    assert scope.defocus_um(core.getPosition(), core.getXYPosition(), 0.0) == pytest.approx(-10.0, abs=1e-6)


def test_z_limits_are_enforced(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, _ = sim
    with pytest.raises(StageLimitError, match=r"SimZ: refusing to move to Z = 151.0 um.*50 \.\. 150 um"):
        core.setPosition(151.0)
    with pytest.raises(StageLimitError):
        core.setRelativePosition(-60.0)
    assert core.getPosition() == FOCUS_Z_UM
    core.setPosition(150.0)
    assert core.getPosition() == 150.0


def test_mda_stops_at_the_z_limit(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, _ = sim
    frames = _record(core)
    with pytest.raises(StageLimitError):
        core.mda.run(useq.MDASequence(stage_positions=[(0.0, 0.0, 148.0)], z_plan={"range": 8, "step": 2}))
    assert [event.z_pos for _, event, _ in frames] == [144.0, 146.0, 148.0, 150.0]


def test_mda_z_stack_frames_at_the_planned_positions(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, _ = sim
    frames = _record(core)
    sequence = useq.MDASequence(stage_positions=[(0.0, 0.0, FOCUS_Z_UM)], z_plan={"range": 16, "step": 4})
    core.mda.run(sequence)
    expected_z = [92.0, 96.0, 100.0, 104.0, 108.0]
    assert len(frames) == len(list(sequence.iter_events())) == 5
    assert [event.index["z"] for _, event, _ in frames] == [0, 1, 2, 3, 4]
    assert [event.z_pos for _, event, _ in frames] == expected_z
    assert [meta["position"]["z"] for _, _, meta in frames] == pytest.approx(expected_z)
    assert all(image.shape == (96, 128) and image.dtype == np.uint16 for image, _, _ in frames)
    sharpness = [_sharpness(image) for image, _, _ in frames]
    assert int(np.argmax(sharpness)) == 2, (
        f"the camera must see the stage: sharpest plane should be 100 um, {sharpness}"
    )
    assert core.getPosition() == FOCUS_Z_UM  # pymmcore-plus restores the start position (focus direction known)


def test_mda_time_lapse_over_two_positions(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, scope = sim
    start_s = scope.clock_s()
    frames = _record(core)
    positions = [(0.0, 0.0, FOCUS_Z_UM), (150.0, -120.0, FOCUS_Z_UM + 3.0)]
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 3}, stage_positions=positions, axis_order="tp")
    core.mda.run(sequence)
    assert len(frames) == 6
    assert [(event.index["t"], event.index["p"]) for _, event, _ in frames] == [
        (t, p) for t in range(3) for p in range(2)
    ]
    for _, event, meta in frames:
        x, y, z = positions[event.index["p"]]
        assert (meta["position"]["x"], meta["position"]["y"], meta["position"]["z"]) == pytest.approx((x, y, z))
    first_p0, first_p1 = frames[0][0].astype(np.float64), frames[1][0].astype(np.float64)
    again_p0 = frames[2][0].astype(np.float64)
    # the same field twice differs only by noise; another stage position shows other cells
    assert np.corrcoef(first_p0.ravel(), again_p0.ravel())[0, 1] > 0.9
    assert np.corrcoef(first_p0.ravel(), first_p1.ravel())[0, 1] < 0.5
    assert scope.clock_s() == pytest.approx(start_s + 6 * TIME_PER_FRAME_S)
    assert scope.last_frame_t_s == pytest.approx(start_s + 5 * TIME_PER_FRAME_S)
    assert isinstance(scope, SimulatedMicroscope)


def test_exposure_is_validated(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, _ = sim
    with pytest.raises(UserError, match=r"exposure must be in \(0, 60000\] ms, got 0"):
        core.setExposure(0.0)
    assert core.getExposure() == 10.0


def test_longer_exposure_collects_proportionally_more_light(
    sim: tuple[UniMMCore, ClockedMicroscope], config: AppConfig
) -> None:
    core, _ = sim
    offset_adu = config.simulator.camera.offset_adu
    core.snapImage()
    signal_10ms = float(core.getImage().mean()) - offset_adu
    core.setExposure(20.0)
    core.snapImage()
    signal_20ms = float(core.getImage().mean()) - offset_adu
    assert signal_20ms / signal_10ms == pytest.approx(2.0, rel=0.05)


def test_z_origin_shifts_reported_positions_not_the_optics(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, scope = sim
    core.setOrigin()
    try:
        assert core.getPosition() == 0.0
        core.setPosition(-10.0)  # physically 90 um: 10 um below focus
        with pytest.raises(StageLimitError, match=r"-50 \.\. 50 um"):
            core.setPosition(51.0)
        core.snapImage()
        frame = core.getImage()
        assert frame.shape == scope.frame_shape
    finally:
        core.setAdapterOrigin(core.getPosition() + FOCUS_Z_UM)  # back to the simulator's coordinates
    assert core.getPosition() == 90.0


def test_fixed_step_clock_counts_frames() -> None:
    clock = SimClock(time_per_frame_s=0.5)
    assert clock.last_frame_s is None
    assert [clock.frame_exposed(exposure_ms=100.0) for _ in range(3)] == [0.0, 0.5, 1.0]
    assert clock.now_s() == 1.5 and clock.last_frame_s == 1.0


def test_wall_clock_moves_on_by_itself() -> None:
    clock = SimClock(time_per_frame_s=None)
    first = clock.frame_exposed(exposure_ms=1.0)  # a frame takes its exposure, so time has passed after it
    assert clock.now_s() > first >= 0.0


def test_hardware_sequenced_time_lapse_reports_simulated_time(sim: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, scope = sim
    frames = _record(core)
    start_s = scope.clock_s()
    core.mda.engine.use_hardware_sequencing = True
    try:
        core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 4}))
    finally:
        core.mda.engine.use_hardware_sequencing = False
    assert [event.index["t"] for _, event, _ in frames] == [0, 1, 2, 3]
    times_s = [float(meta["camera_metadata"]["SimTime_s"]) for _, _, meta in frames]
    assert times_s == pytest.approx([start_s + i * TIME_PER_FRAME_S for i in range(4)])
    assert all(float(meta["camera_metadata"]["SimStageZ_um"]) == FOCUS_Z_UM for _, _, meta in frames)


def test_camera_renders_the_drift_at_the_simulated_time(config: AppConfig) -> None:
    # linear drift of 1 um per simulated second, 8 s per frame: the focus moves 8 um between frames
    drift = config.simulator.drift.model_copy(update={"model": "linear", "rate_um_per_min": 60.0})
    drifting = config.simulator.model_copy(update={"drift": drift, "time_per_frame_s": 8.0})
    core, scope = create_simulated_core(config.optics, drifting)
    try:
        core.snapImage()  # t = 0 s, at the nominal focus
        at_start = _sharpness(core.getImage())
        core.snapImage()  # t = 8 s: the focus has drifted 8 um deeper, this frame is blurred
        drifted = _sharpness(core.getImage())
        assert scope.clock_s() == 16.0
        core.setPosition(scope.focus_z_um(core.getXYPosition(), t_s=16.0))  # follow the drift
        assert core.getPosition() == pytest.approx(FOCUS_Z_UM + 16.0)
        core.snapImage()  # t = 16 s, refocused
        refocused = _sharpness(core.getImage())
    finally:
        core.unloadAllDevices()
    assert at_start > 1.5 * drifted
    assert refocused > 1.5 * drifted


# ---------------------------------------------------------------- stains as channel presets, the focus lock


@pytest.fixture(scope="module")
def two_stains() -> Iterator[tuple[UniMMCore, ClockedMicroscope]]:
    config = parse_config(
        {
            "optics": {"channels": {"Cytoplasm": {"emission_wavelength_nm": 510}}},
            "simulator": {
                "camera": {"width_px": 128, "height_px": 128, "exposure_ms": 10},
                "specimen": {"field_size_um": [160, 160], "photons_per_um3": 1500, "nuclei_per_mm2": 4000},
                "focus_z_um": FOCUS_Z_UM,
                "z_limits_um": [50, 150],
                "time_per_frame_s": TIME_PER_FRAME_S,
                "channels": {"Nuclei": {"stain": "nuclei"}, "Cytoplasm": {"stain": "cytoplasm", "brightness": 1.5}},
                "drift": {"model": "linear", "rate_um_per_min": 6.0},  # the stand: 0.2 um per frame
                "sample_drift": {"model": "linear", "rate_um_per_min": 3.0},  # the sample: 0.1 um per frame
                "focus_lock": True,
            },
        }
    )
    core, scope = create_simulated_core(config.optics, config.simulator)
    yield core, scope
    core.unloadAllDevices()


def test_each_channel_preset_shows_its_own_stain(two_stains: tuple[UniMMCore, ClockedMicroscope]) -> None:
    core, _ = two_stains
    assert core.getChannelGroup() == "Channel"
    assert set(core.getAvailableConfigs("Channel")) == {"Nuclei", "Cytoplasm"}
    frames = {}
    for name in ("Nuclei", "Cytoplasm", "Nuclei"):
        core.setConfig("Channel", name)
        core.snapImage()
        frames.setdefault(name, []).append(core.getImage().astype(float))
    nuclei, cytoplasm = frames["Nuclei"][0], frames["Cytoplasm"][0]
    # the same cells, other structures: weakly related images, both well above the camera offset
    assert np.corrcoef(nuclei.ravel(), cytoplasm.ravel())[0, 1] < 0.6
    assert np.corrcoef(nuclei.ravel(), frames["Nuclei"][1].ravel())[0, 1] > 0.9
    assert cytoplasm.mean() > 110 and nuclei.mean() > 110


def test_the_lock_removes_the_stand_drift_but_not_the_sample_drift(
    two_stains: tuple[UniMMCore, ClockedMicroscope],
) -> None:
    core, scope = two_stains
    stage = scope.focus_stage
    assert stage is not None and stage.focus_lock is not None
    core.setConfig("Channel", "Nuclei")
    core.setPosition(FOCUS_Z_UM)
    core.setProperty("SimPFS", "State", "On")
    try:
        assert core.getProperty("SimPFS", "Status") == "Locked"
        t0 = scope.clock_s()
        z0, focus0 = core.getPosition(), scope.focus_z_um((0, 0), t0)
        for _ in range(10):
            core.snapImage()
        t1 = scope.clock_s()
        # the drive followed the stand's drift (0.2 um per frame), the focus moved by both drifts
        assert core.getPosition() - z0 == pytest.approx(scope.stand_drift_um(t1) - scope.stand_drift_um(t0))
        defocus_change = (core.getPosition() - scope.focus_z_um((0, 0), t1)) - (z0 - focus0)
        assert defocus_change == pytest.approx(-(t1 - t0) * 3.0 / 60.0)  # the sample's drift alone
        moves = stage.moves_while_locked
        core.setPosition(FOCUS_Z_UM + 5.0)  # refused by the lock's hold, counted
        assert stage.moves_while_locked == moves + 1
        before = core.getPosition()
        core.setPosition("SimPFSOffset", 2.0)  # the offset moves focus instead
        assert core.getPosition() - before == pytest.approx(2.0)
        stage.focus_lock.lose()
        assert core.getProperty("SimPFS", "Status") == "Lost"
        held = core.getPosition()
        core.snapImage()
        assert core.getPosition() == pytest.approx(held)  # no longer following the stand
    finally:
        core.setProperty("SimPFS", "State", "Off")
        core.setPosition("SimPFSOffset", 0.0)
