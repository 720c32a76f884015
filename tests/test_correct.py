"""`acquire-refocus correct`: refocused TIFFs and defocus.csv, bad files reported while the rest are processed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquire_refocus.cli import main


def test_correct_writes_tiffs_and_csv_and_reports_bad_files(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good_a = inputs / "a.tif"
    good_b = inputs / "b.tiff"
    tifffile.imwrite(good_a, (rng.random((80, 96)) * 4000 + 100).astype(np.uint16))
    tifffile.imwrite(good_b, rng.random((1, 64, 70)).astype(np.float32))  # singleton axis: squeezed
    not_an_image = inputs / "notes.tif"
    not_an_image.write_text("this is not a TIFF")
    stack = inputs / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 64, 64), np.uint16), photometric="minisblack")
    missing = inputs / "missing.tif"
    out = tmp_path / "out"

    code = main(
        [
            "correct",
            str(good_a),
            str(not_an_image),
            str(good_b),
            str(stack),
            str(missing),
            "--out",
            str(out),
            "--weights",
            str(tiny_weights),
            "--engine",
            "torch",
        ]
    )

    assert code != 0
    error = capsys.readouterr().err
    for bad in (not_an_image, stack, missing):
        assert str(bad) in error
    assert "3 file(s) could not be processed" in error
    a = tifffile.imread(out / "a.tif")
    assert a.shape == (80, 96) and a.dtype == np.float32
    assert tifffile.imread(out / "b.tif").shape == (64, 70)
    assert not (out / "notes.tif").exists()
    with (out / "defocus.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [str(good_a), str(good_b)]
    for row in rows:
        float(row["defocus_um"])
        assert 0.0 <= float(row["confidence"]) <= 1.0


def test_correct_all_good_exits_zero(tmp_path: Path, tiny_weights: Path) -> None:
    frame = tmp_path / "frame.tif"
    tifffile.imwrite(frame, np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    out = tmp_path / "out"
    assert (
        main(
            [
                "correct",
                str(frame),
                "--out",
                str(out),
                "--weights",
                str(tiny_weights),
                "--engine",
                "torch",
                "--pixel-size-um",
                "0.5",
            ]
        )
        == 0
    )
    assert tifffile.imread(out / "frame.tif").shape == (64, 64)


def test_correct_with_foreign_weights_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not torch")
    frame = tmp_path / "frame.tif"
    tifffile.imwrite(frame, np.ones((64, 64), np.uint16))
    assert main(["correct", str(frame), "--out", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "not a readable acquire-refocus weights file" in capsys.readouterr().err


def _frame(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.random.default_rng(seed).integers(0, 4000, (64, 64), dtype=np.uint16))
    return path


def _correct(*args: str | Path, weights: Path) -> int:
    return main(["correct", *map(str, args), "--weights", str(weights), "--engine", "torch"])


def test_correct_into_the_inputs_folder_refuses_and_keeps_the_input(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = _frame(tmp_path / "frame.tif")
    before = frame.read_bytes()

    assert _correct(frame, "--out", tmp_path, weights=tiny_weights) == 2

    error = capsys.readouterr().err
    assert "error:" in error and "choose another --out" in error and "Traceback" not in error
    assert frame.read_bytes() == before
    assert not (tmp_path / "defocus.csv").exists()


def test_correct_twice_into_one_out_refuses_and_keeps_the_first_results(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _frame(tmp_path / "in" / "a.tif"), _frame(tmp_path / "in" / "b.tif", seed=1)
    out = tmp_path / "out"
    assert _correct(first, "--out", out, weights=tiny_weights) == 0
    kept = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()

    assert _correct(second, "--out", out, weights=tiny_weights) == 2  # only defocus.csv is in the way

    error = capsys.readouterr().err
    assert str(out / "defocus.csv") in error and "choose another --out" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == kept
    assert _correct(first, "--out", tmp_path / "out2", weights=tiny_weights) == 0
    (tmp_path / "out2" / "defocus.csv").unlink()
    assert _correct(first, "--out", tmp_path / "out2", weights=tiny_weights) == 2  # a.tif is in the way
    assert str(tmp_path / "out2" / "a.tif") in capsys.readouterr().err


@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_correct_out_that_cannot_be_a_folder_is_a_clear_error(
    tmp_path: Path, tiny_weights: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = _frame(tmp_path / "frame.tif")
    blocker = tmp_path / "results"
    blocker.write_text("the user's notes")
    out = blocker if where == "existing file" else blocker / "sub"

    assert _correct(frame, "--out", out, weights=tiny_weights) == 2

    error = capsys.readouterr().err
    assert f"--out {out}" in error and "Traceback" not in error
    assert blocker.read_text() == "the user's notes"


def test_correct_same_name_from_two_folders_is_listed_by_input_path(tmp_path: Path, tiny_weights: Path) -> None:
    one, two = _frame(tmp_path / "a" / "x.tif"), _frame(tmp_path / "b" / "x.tif", seed=1)
    out = tmp_path / "out"

    assert _correct(one, two, "--out", out, weights=tiny_weights) == 0

    assert sorted(path.name for path in out.iterdir()) == ["defocus.csv", "x.tif", "x_2.tif"]
    with (out / "defocus.csv").open() as handle:
        assert [row["file"] for row in csv.DictReader(handle)] == [str(one), str(two)]


def test_correct_reports_a_bad_file_once_without_an_error_log_line(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _frame(tmp_path / "good.tif")
    bad = tmp_path / "bad.tif"
    bad.write_text("this is not a TIFF")

    assert _correct(good, bad, "--out", tmp_path / "out", weights=tiny_weights) == 2

    error = capsys.readouterr().err
    assert error.count("not a readable TIFF image") == 1
    assert "level=ERROR" not in error


@pytest.mark.parametrize("pixel_size_um", ["0", "nan", "1e-9"])
def test_an_unusable_pixel_size_is_refused_once_before_any_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pixel_size_um: str
) -> None:
    image = tmp_path / "in.tif"
    tifffile.imwrite(image, np.full((64, 64), 100, np.uint16))
    out = tmp_path / "out"
    assert main(["correct", str(image), "--out", str(out), f"--pixel-size-um={pixel_size_um}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("acquire-refocus correct: error:")]
    assert len(errors) == 1 and "pixel_size_um" in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_correct_with_only_bad_files_writes_nothing_and_a_rerun_can_use_the_same_out(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan_frame = tmp_path / "nan.tif"
    tifffile.imwrite(nan_frame, np.full((64, 64), np.nan, np.float32))
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.ones((32, 80), np.uint16))
    truncated = tmp_path / "truncated.tif"
    tifffile.imwrite(truncated, np.arange(128 * 128, dtype=np.uint16).reshape(128, 128))
    truncated.write_bytes(truncated.read_bytes()[:4000])
    out = tmp_path / "out"

    assert _correct(nan_frame, small, truncated, "--out", out, weights=tiny_weights) == 2

    error = capsys.readouterr().err
    assert "none of the 3 file(s) could be processed, nothing was written" in error
    for bad, reason in ((nan_frame, "NaN"), (small, "64"), (truncated, str(truncated))):
        assert reason in error and str(bad) in error
    assert not out.exists()
    good = _frame(tmp_path / "good.tif")
    assert _correct(good, "--out", out, weights=tiny_weights) == 0
    assert (out / "good.tif").is_file()
