"""`acquire-refocus calibrate-focus` on simulated z-stacks, written to disk as a user's would be: plane folders and
a multi-page TIFF; and its answers to stacks it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from support import SMALL_FIELD_SIMULATOR

from acquire_refocus.cli import main
from acquire_refocus.config import parse_config

PRESET_60X = Path(__file__).resolve().parents[1] / "configs" / "optics" / "60x-1.40-oil.yaml"

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("restore_logging")]


@pytest.fixture(scope="module")
def simulated_stacks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from acquire_refocus.sim.dataset import write_simulated_dataset

    config = parse_config({"simulator": SMALL_FIELD_SIMULATOR})
    root = tmp_path_factory.mktemp("calibration") / "stacks"
    write_simulated_dataset(
        root, config.optics, config.simulator, fields=2, defocus_um=np.arange(-8.0, 8.01, 1.0), seed=5
    )
    return root


@pytest.fixture(scope="module")
def stacks_60x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 256 px fields of the simulated nuclei (twice as dense, so neither is empty) through the 60x / 1.4 oil
    preset, -4 to +4 um at 0.25 um."""
    from acquire_refocus.config import load_config
    from acquire_refocus.sim.dataset import write_simulated_dataset

    config = load_config(PRESET_60X)
    simulator = config.simulator.model_copy(
        update={
            "camera": config.simulator.camera.model_copy(update={"width_px": 256, "height_px": 256}),
            "specimen": config.simulator.specimen.model_copy(
                update={"field_size_um": (40.0, 40.0), "nuclei_per_mm2": 3000.0}
            ),
        }
    )
    root = tmp_path_factory.mktemp("calibration-60x") / "stacks"
    write_simulated_dataset(root, config.optics, simulator, fields=2, defocus_um=np.arange(-4.0, 4.01, 0.25), seed=3)
    return root


def first_field_fit(args: list[str], json_path: Path) -> dict:
    """Run calibrate-focus with `args` and return its fit of the first field, read back from --json."""
    assert main(["calibrate-focus", *args, "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text(encoding="utf-8"))["fields"][0]


def test_a_simulated_dataset_gives_the_width_and_where_the_sharpest_plane_lies(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration.json"
    assert main(["calibrate-focus", str(simulated_stacks), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))
    assert len(result["fields"]) == 2 and not result["skipped"]
    # the default optics' loop assumes 4 um (4/3 of the depth of field); measured 3.4-6.4 um (median 3.9) on 8
    # fields of this specimen, 3.9-5.1 um on the default one
    assert 3.0 <= result["width_um"] <= 6.0
    assert abs(result["sharpest_minus_focus_um"]) <= 1.5
    assert f"sharpness_width_um: {result['width_um']:.1f}" in printed
    assert "target_offset_um:" in printed


def test_at_60x_the_nuclei_show_focus_only_in_a_band_coarser_than_the_optics_resolution(
    stacks_60x: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The simulated nuclei have no texture finer than 0.5 um: in the 60x optics' own band (0.20 um) their
    sharpness is camera noise, and a loop measuring it finds no focus (it did not hold focus at 60x). The scan
    finds a band where both fields show a peak, a range that follows their width (the default, 0.63 um, is 4/3 of
    the depth of field), and a dither large enough to see it."""
    assert main(["calibrate-focus", str(stacks_60x), "--config", str(PRESET_60X), "--band-um", "0.2009"]) == 2
    assert "no field could be calibrated" in capsys.readouterr().err

    out = tmp_path / "calibration.json"
    assert main(["calibrate-focus", str(stacks_60x), "--config", str(PRESET_60X), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))
    assert len(result["fields"]) == 2
    assert result["sharpness_band_um"] >= 0.5  # measured: 0.60 um
    assert f"sharpness_band_um: {result['sharpness_band_um']:g}" in printed
    assert [b["fields"] for b in result["bands"][:3]] == [0, 0, 0]  # 1, 1.5 and 2 times 0.20 um
    assert 2.0 <= result["width_um"] <= 4.0  # measured 2.77 um (fields 2.48 and 3.05)
    assert result["range_um"] == pytest.approx(result["width_um"], rel=0.06)
    # the default dither (0.047 um) leaves two frames' fit 2.2 um noisy; the recommendation brings it to half the
    # 0.47 um depth of field
    assert 0.2 <= result["sharpness_dither_um"] <= 0.47  # at most the depth of field
    assert "sharpness_dither_um:" in printed
    assert result["settings"]["sharpness_band_um"] == result["sharpness_band_um"]
    assert result["settings"]["sharpness_width_um"] == round(result["width_um"], 1)
    # fields whose sharpest planes lie further apart than the 0.47 um depth of field get a note on hold: start
    peaks = [field["peak_z_um"] for field in result["fields"]]
    assert ("sharpest_plane_spread_um" in result) == (max(peaks) - min(peaks) > 0.47)
    assert ("focus.hold: start" in printed) == ("sharpest_plane_spread_um" in result)


def test_a_z_step_given_in_the_wrong_unit_gives_no_recommendation(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 um planes declared 1 nm apart: a 4 nm wide focus curve, which no config could hold, is refused."""
    from acquire_refocus.datasets.zstack import read_zstack_folders

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, read_zstack_folders(simulated_stacks)[0].planes)
    assert main(["calibrate-focus", str(stack), "--z-step-um", "0.001"]) == 2
    captured = capsys.readouterr()
    assert "which no microscope's focus curve does" in captured.err and "Traceback" not in captured.err


def test_a_multi_page_tiff_gives_the_same_fit_as_its_plane_folders(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from acquire_refocus.datasets.zstack import read_zstack_folders

    field = read_zstack_folders(simulated_stacks)[0]
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, field.planes)
    from_tiff = first_field_fit([str(stack), "--z-step-um", "1", "--in-focus-index", "8"], tmp_path / "tiff.json")
    from_folders = first_field_fit([str(simulated_stacks)], tmp_path / "folders.json")
    assert from_tiff["width_um"] == pytest.approx(from_folders["width_um"], rel=1e-6)
    assert from_tiff["peak_z_um"] == pytest.approx(from_folders["peak_z_um"], abs=1e-6)
    capsys.readouterr()


def test_a_stack_taken_from_the_top_down_is_read_with_z_order_decreasing(
    simulated_stacks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same planes stored in the opposite order, with the in-focus plane given by its index in that order
    (off-centre, so a wrong mapping shows): the same peak and width as the plane folders."""
    from acquire_refocus.datasets.zstack import read_zstack_folders

    field = read_zstack_folders(simulated_stacks)[0]
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, field.planes[::-1][2:])  # planes +6 .. -8 um: the in-focus one is now index 6
    reversed_fit = first_field_fit(
        [str(stack), "--z-step-um", "1", "--in-focus-index", "6", "--z-order", "decreasing"], tmp_path / "r.json"
    )
    folder_fit = first_field_fit([str(simulated_stacks)], tmp_path / "folders.json")
    assert reversed_fit["peak_z_um"] == pytest.approx(folder_fit["peak_z_um"], abs=1e-6)
    assert reversed_fit["width_um"] == pytest.approx(folder_fit["width_um"], rel=1e-6)
    capsys.readouterr()


def test_a_fit_over_too_few_planes_is_refused(simulated_stacks: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Within 1.2 um of the sharpest plane a 1 um stack has 3 planes, which any parabola fits exactly."""
    assert main(["calibrate-focus", str(simulated_stacks), "--range-um", "1.2"]) == 2
    captured = capsys.readouterr()
    assert "3 planes within 1.20 um of the sharpest; the fit needs 5" in captured.out
    assert "no field could be calibrated" in captured.err


def test_arguments_that_contradict_a_simulated_dataset_are_refused(
    simulated_stacks: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["calibrate-focus", str(simulated_stacks), "--z-step-um", "2"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["calibrate-focus", str(simulated_stacks), "--file-pattern", "*_w1*"]) == 2
    assert "a simulated dataset has one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("planes", "extra", "message"),
    [
        (np.zeros((64, 64), np.uint16), ["--z-step-um", "1"], "expected a z-stack of shape (planes, height, width)"),
        (np.zeros((9, 64, 64), np.uint16), [], "--z-step-um"),
        (np.ones((3, 64, 64), np.uint16), ["--z-step-um", "1"], "3 planes; a calibration needs at least 5"),
        (np.full((9, 64, 64), 100, np.uint16), ["--z-step-um", "1"], "no field could be calibrated"),
        # camera noise alone: this seed fits a peak (width 9.7 um) by chance, which must not pass for focus
        (
            np.random.default_rng(2).poisson(100, (9, 64, 64)).astype(np.uint16),
            ["--z-step-um", "1"],
            "no field could be calibrated",
        ),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "-1"], "--z-step-um must be a positive number"),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "1", "--in-focus-index", "9"], "planes 0 .. 8"),
        (np.ones((64, 64, 3), np.uint8), ["--z-step-um", "1"], "looks like a colour (RGB) image"),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "1", "--band-um", "1e9"], "takes 0.05 to 20 um"),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "1e300"], "lie at most 100 um apart"),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "1", "--pixel-size-um", "1e-6"], "0.01 to 100 um"),
        (
            np.ones((9, 64, 64), np.uint16),
            ["--z-step-um", "1", "--plot", "no/such/folder/focus.png"],
            "the folder no/such/folder does not exist",
        ),
        (np.ones((9, 64, 64), np.uint16), ["--z-step-um", "inf"], "--z-step-um must be a positive number"),
        (
            np.ones((9, 64, 64), np.uint16),
            ["--z-step-um", "1", "--json", "no/such/folder/out.json"],
            "the folder no/such/folder does not exist",
        ),
    ],
    ids=[
        "2-D",
        "no-step",
        "too-few-planes",
        "flat",
        "noise-only",
        "negative-step",
        "focus-index-out-of-range",
        "rgb",
        "band-beyond-the-config",
        "z-step-beyond-a-microscope",
        "pixel-size-beyond-a-microscope",
        "plot-in-a-missing-folder",
        "infinite-step",
        "json-in-a-missing-folder",
    ],
)
def test_unusable_stacks_get_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], planes: np.ndarray, extra: list[str], message: str
) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, planes, photometric="rgb" if planes.shape[-1] == 3 else "minisblack")
    assert main(["calibrate-focus", str(path), *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_a_file_that_is_not_a_tiff_or_a_missing_path_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "notes.tif"
    junk.write_text("not an image", encoding="utf-8")
    assert main(["calibrate-focus", str(junk), "--z-step-um", "1"]) == 2
    assert "notes.tif: not a readable TIFF" in capsys.readouterr().err
    assert main(["calibrate-focus", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    (tmp_path / "planes" / "z00").mkdir(parents=True)
    assert main(["calibrate-focus", str(tmp_path / "planes")]) == 2
    assert "give the stage step between plane folders with --z-step-um" in capsys.readouterr().err
