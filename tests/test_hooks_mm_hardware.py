"""Loading a real Micro-Manager hardware config into pymmcore-plus: Micro-Manager's own DemoCamera adapters and
demo config (PyPI mm-test-adapters), a real MDA through `core.mda.run`, frames into the real FramePipeline."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq
from support import PassThrough, Recorder

from acquire_refocus.core_lifetime import release_core
from acquire_refocus.errors import UserError
from acquire_refocus.hooks.mm_hardware import hardware_core, load_hardware_core
from acquire_refocus.pipeline import FrameInfo, FramePipeline

mm_test_adapters = pytest.importorskip("mm_test_adapters")
ADAPTERS = Path(mm_test_adapters.device_adapter_path())
DEMO_CONFIG = ADAPTERS / "MMConfig_demo.cfg"


@pytest.fixture(scope="module")
def demo_core() -> Iterator[Any]:
    with hardware_core(DEMO_CONFIG, ADAPTERS) as core:
        yield core


def test_demo_config_loads_with_its_devices(demo_core: Any) -> None:
    assert demo_core.getCameraDevice() == "Camera"
    assert demo_core.getFocusDevice() == "Z"
    assert demo_core.getPixelSizeUm() == 1.0
    assert demo_core.systemConfigurationFile() == str(DEMO_CONFIG.resolve())


def test_mda_frames_reach_pipeline_and_raw_is_saved(demo_core: Any, tmp_path: Path) -> None:
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        stage_positions=[{"x": 1.0, "y": 2.0, "z": 10.0}],
        z_plan={"range": 2, "step": 1},
        axis_order="tpz",
    )
    collect = Recorder()
    frame_z_um: list[float] = []

    with FramePipeline(PassThrough(), [collect]) as pipeline:

        def on_frame(image: np.ndarray, event: useq.MDAEvent, meta: dict[str, Any]) -> None:
            position = meta["position"]
            frame_z_um.append(position["z"])
            pipeline.submit(
                image,
                FrameInfo(
                    axes={str(getattr(k, "value", k)): int(v) for k, v in event.index.items()},
                    stage_z_um=position["z"],
                    stage_xy_um=(position["x"], position["y"]),
                    t_acquired=0.0,
                    pixel_size_um=meta["pixel_size_um"],
                ),
            )

        demo_core.mda.events.frameReady.connect(on_frame)
        try:
            demo_core.mda.run(sequence, output=tmp_path / "raw.ome.tif")
        finally:
            demo_core.mda.events.frameReady.disconnect(on_frame)

    expected = [(t, z, 9.0 + z) for t in range(2) for z in range(3)]
    got = sorted((r.info.axes["t"], r.info.axes["z"], r.info.stage_z_um) for r in collect.results)
    assert got == [pytest.approx(e) for e in expected]
    assert frame_z_um == pytest.approx([z for _, _, z in expected])  # the DemoCamera stage really moved
    assert all(r.info.axes["p"] == 0 and r.info.pixel_size_um == 1.0 for r in collect.results)
    assert all(r.info.stage_xy_um == pytest.approx((1.0, 2.0), abs=0.01) for r in collect.results)
    assert {r.status for r in collect.results} == {"refocused"}

    saved = tifffile.imread(tmp_path / "raw.ome.tif")  # pymmcore-plus's own writer saved every raw frame
    assert saved.shape == (2, 3, 512, 512) and saved.dtype == np.uint16
    by_axes = {(r.info.axes["t"], r.info.axes["z"]): r.raw for r in collect.results}
    assert all(np.array_equal(saved[t, z], by_axes[(t, z)]) for t in range(2) for z in range(3))


def test_focus_device_is_set_and_checked() -> None:
    with hardware_core(DEMO_CONFIG, ADAPTERS, focus_device="Z") as core:
        assert core.getFocusDevice() == "Z"
    with pytest.raises(UserError, match=r"'XY' is not a Z stage.*Z stages: Z"):
        load_hardware_core(DEMO_CONFIG, ADAPTERS, focus_device="XY")


def test_release_unloads_and_is_idempotent() -> None:
    core = load_hardware_core(DEMO_CONFIG, ADAPTERS)
    assert "Camera" in core.getLoadedDevices()
    release_core(core)
    release_core(core)
    assert list(core.getLoadedDevices()) == ["Core"]


@pytest.mark.timeout(120)
def test_process_exits_cleanly_with_a_core_left_loaded(tmp_path: Path) -> None:
    # A core still loaded at exit used to kill the interpreter now and then ("FATAL: exception not rethrown",
    # status 134) after MMCore's notification thread entered Python during shutdown; the atexit release prevents it.
    script = (
        "import useq\n"
        "from acquire_refocus.hooks.mm_hardware import load_hardware_core\n"
        f"core = load_hardware_core({str(DEMO_CONFIG)!r}, {str(ADAPTERS)!r})\n"
        "core.mda.run(useq.MDASequence(time_plan={'interval': 0, 'loops': 3}, channels=['DAPI']))\n"
    )
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=False)
        assert proc.returncode == 0 and "FATAL" not in proc.stderr, proc.stderr[-2000:]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"hardware config not found.*nope\.cfg"):
        load_hardware_core(tmp_path / "nope.cfg", ADAPTERS)


def test_missing_adapter_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"Micro-Manager folder not found.*mm_app_path"):
        load_hardware_core(DEMO_CONFIG, tmp_path / "no-such-dir")


def test_folder_without_the_needed_adapters(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"needs device adapters DemoCamera, Utilities.*found: none"):
        load_hardware_core(DEMO_CONFIG, tmp_path)


def test_config_naming_an_unknown_device(tmp_path: Path) -> None:
    config = tmp_path / "broken.cfg"
    config.write_text("Property,Core,Initialize,0\nDevice,Cam,DemoCamera,NoSuchCamera\nProperty,Core,Initialize,1\n")
    with pytest.raises(UserError, match=r"could not load this hardware configuration.*NoSuchCamera"):
        load_hardware_core(config, ADAPTERS)


def test_config_without_a_camera(tmp_path: Path) -> None:
    config = tmp_path / "no-camera.cfg"
    config.write_text("# only a comment: loads, but holds no devices\n")
    with pytest.raises(UserError, match="has no camera"):
        load_hardware_core(config, ADAPTERS)


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_pymmcore_plus_config_runs_on_the_democamera(tmp_path: Path) -> None:
    from acquire_refocus.config import load_config, replace
    from acquire_refocus.sequence import parse_sequence

    config = load_config(CONFIGS / "pymmcore-plus.yaml")
    acq = config.acquisition
    assert acq.backend == "pymmcore-plus"
    with pytest.raises(UserError, match=r"MMConfig_scope\.cfg"):  # the placeholder, until the user edits it
        load_hardware_core(acq.mm_config_file, acq.mm_app_path)

    acq = replace(acq, mm_config_file=DEMO_CONFIG, mm_app_path=ADAPTERS)  # what a user edits, here the DemoCamera
    sequence = parse_sequence(acq.sequence)
    short = sequence.replace(time_plan={"interval": 0, "loops": 2})  # the config's channel, 2 time points
    frames: list[tuple[dict[str, int], str]] = []
    with hardware_core(acq.mm_config_file, acq.mm_app_path, focus_device=acq.focus_device) as core:

        def on_frame(image: np.ndarray, event: useq.MDAEvent, meta: dict[str, Any]) -> None:
            axes = {str(getattr(k, "value", k)): v for k, v in event.index.items()}
            frames.append((axes, core.getCurrentConfig("Channel")))

        core.mda.events.frameReady.connect(on_frame)
        core.mda.run(short)
    assert [axes for axes, _ in frames] == [{"t": 0, "c": 0}, {"t": 1, "c": 0}]
    assert {preset for _, preset in frames} == {"DAPI"}


def test_real_scope_template_loads_and_explains_every_section() -> None:
    from acquire_refocus.config import AppConfig, load_config
    from acquire_refocus.sequence import parse_sequence

    path = CONFIGS / "real-scope-template.yaml"
    config = load_config(path)
    sequence = parse_sequence(config.acquisition.sequence)
    assert len(list(sequence)) == 240 * 2 * 1
    text = path.read_text()
    for section in (
        "version",
        "optics",
        "model",
        "engine",
        "pipeline",
        "publishing",
        "storage",
        "focus",
        "acquisition",
        "log_file",
    ):
        assert f"\n{section}:" in text, section
    for section in ("simulator", "training", "loss"):
        assert section in text  # says why they are left out
    assert set(AppConfig.model_fields) - {"log_level"} == {
        "version",
        "optics",
        "model",
        "engine",
        "pipeline",
        "publishing",
        "storage",
        "focus",
        "acquisition",
        "simulator",
        "training",
        "loss",
        "log_file",
    }
    assert config.focus.mode == "observe"  # a template never moves a real stage before the user chose to
