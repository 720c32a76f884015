"""`acquire-refocus calibrate-focus` on simulated z-stacks, written to disk as a user's would be: plane folders and
a multi-page TIFF; and its answers to stacks it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import SMALL_FIELD_SIMULATOR
from acquire_refocus.cli import main
from acquire_refocus.config import parse_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("restore_logging")]


@pytest.fixture(scope="module")
def simulated_stacks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from acquire_refocus.sim.dataset import write_simulated_dataset

    config = parse_config({"simulator": SMALL_FIELD_SIMULATOR})
    root = tmp_path_factory.mktemp("calibration") / "stacks"
    write_simulated_dataset(root, config.optics, config.simulator, fields=2, defocus_um=np.arange(-8.0, 8.01, 1.0),
                            seed=5)
    return root


def test_a_simulated_dataset_gives_the_width_and_where_the_sharpest_plane_lies(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration.json"
    assert main(["calibrate-focus", str(simulated_stacks), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))
    assert len(result["fields"]) == 2 and not result["skipped"]
    # the default optics' loop assumes 4 um (4/3 of the depth of field); measured 3.8-4.7 um on the default specimen
    assert 3.0 <= result["width_um"] <= 6.0
    assert abs(result["sharpest_minus_focus_um"]) <= 1.5
    assert f"sharpness_width_um: {result['width_um']:.1f}" in printed
    assert "target_offset_um:" in printed


def test_a_multi_page_tiff_gives_the_same_fit_as_its_plane_folders(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from acquire_refocus.sim.dataset import read_zstack_folders

    field = read_zstack_folders(simulated_stacks)[0]
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, field.planes)
    out = tmp_path / "tiff.json"
    assert main(["calibrate-focus", str(stack), "--z-step-um", "1", "--in-focus-index", "8", "--json", str(out)]) == 0
    from_tiff = json.loads(out.read_text(encoding="utf-8"))["fields"][0]
    assert main(["calibrate-focus", str(simulated_stacks), "--json", str(out)]) == 0
    from_folders = json.loads(out.read_text(encoding="utf-8"))["fields"][0]
    assert from_tiff["width_um"] == pytest.approx(from_folders["width_um"], rel=1e-6)
    assert from_tiff["peak_z_um"] == pytest.approx(from_folders["peak_z_um"], abs=1e-6)
    capsys.readouterr()


def test_a_stack_read_the_other_way_round_puts_the_peak_on_the_other_side(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from acquire_refocus.sim.dataset import read_zstack_folders

    field = read_zstack_folders(simulated_stacks)[0]
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, field.planes[::-1])
    out = tmp_path / "reversed.json"
    args = ["calibrate-focus", str(stack), "--z-step-um", "1", "--in-focus-index", "8", "--json", str(out)]
    assert main(args) == 0
    forward = json.loads(out.read_text(encoding="utf-8"))["fields"][0]["peak_z_um"]
    assert main([*args, "--z-order", "decreasing"]) == 0
    backward = json.loads(out.read_text(encoding="utf-8"))["fields"][0]["peak_z_um"]
    assert backward == pytest.approx(-forward, abs=1e-6)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("planes", "extra", "message"),
    [
        (np.zeros((64, 64), np.uint16), ["--z-step-um", "1"], "expected a z-stack of shape (planes, height, width)"),
        (np.zeros((9, 64, 64), np.uint16), [], "--z-step-um"),
        (np.ones((3, 64, 64), np.uint16), ["--z-step-um", "1"], "3 planes; a calibration needs at least 5"),
        (np.full((9, 64, 64), 100, np.uint16), ["--z-step-um", "1"], "no field could be calibrated"),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "-1"], "--z-step-um must be positive"),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "1", "--in-focus-index", "9"], "planes 0 .. 8"),
    ],
    ids=["2-D", "no-step", "too-few-planes", "flat", "negative-step", "focus-index-out-of-range"],
)
def test_unusable_stacks_get_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], planes: np.ndarray, extra: list[str], message: str
) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, planes, photometric="minisblack")
    assert main(["calibrate-focus", str(path), *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_a_file_that_is_not_a_tiff_or_a_missing_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "notes.tif"
    junk.write_text("not an image", encoding="utf-8")
    assert main(["calibrate-focus", str(junk), "--z-step-um", "1"]) == 2
    assert "notes.tif: not a readable TIFF" in capsys.readouterr().err
    assert main(["calibrate-focus", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
