"""`acquire-refocus correct`: refocused TIFFs and defocus.csv, bad files reported while the rest are processed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquire_refocus.cli import main


def test_correct_writes_tiffs_and_csv_and_reports_bad_files(tmp_path: Path, tiny_weights: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
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

    code = main(["correct", str(good_a), str(not_an_image), str(good_b), str(stack), str(missing),
                 "--out", str(out), "--weights", str(tiny_weights), "--engine", "torch"])

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
    assert [r["file"] for r in rows] == ["a.tif", "b.tiff"]
    for row in rows:
        float(row["defocus_um"])
        assert 0.0 <= float(row["confidence"]) <= 1.0


def test_correct_all_good_exits_zero(tmp_path: Path, tiny_weights: Path) -> None:
    frame = tmp_path / "frame.tif"
    tifffile.imwrite(frame, np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["correct", str(frame), "--out", str(out), "--weights", str(tiny_weights), "--engine", "torch",
                 "--pixel-size-um", "0.5"]) == 0
    assert tifffile.imread(out / "frame.tif").shape == (64, 64)


def test_correct_with_foreign_weights_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not torch")
    frame = tmp_path / "frame.tif"
    tifffile.imwrite(frame, np.ones((64, 64), np.uint16))
    assert main(["correct", str(frame), "--out", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "not a readable acquire-refocus weights file" in capsys.readouterr().err
