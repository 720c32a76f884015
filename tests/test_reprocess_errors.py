"""Bad input to `correct DATASET`: one clear message each (exit 2, no traceback), before any work, with nothing of
the input touched. (A truncated file inside a dataset is a failed frame while the others go on:
test_reprocess_formats.py.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import reprocess_data as data
import tifffile
from support import free_tcp_address
from test_reprocess_formats import tree_digest

from acquire_refocus.cli import main

pytestmark = pytest.mark.usefixtures("restore_logging")


def _correct(dataset: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(["correct", str(dataset), "--out", str(out), "--weights", str(weights), "--engine", "torch", *extra])


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("acquire-refocus correct: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def ome_tiff(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "stack.ome.tif"
    path.parent.mkdir()
    data.write_ome_tiff(path, data.frames_tpcz(1, 1, 2, 2))
    return path


def test_a_dataset_without_a_pixel_size_needs_one(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, data.frames_tpcz(3, 1, 1, 1)[:, 0, 0, 0], photometric="minisblack")  # no pixel size
    before = tree_digest(tmp_path)

    assert _correct(stack, tmp_path / "out", tiny_weights) == 2

    message = _one_error(capsys)
    assert "no pixel size" in message and "--pixel-size-um" in message
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before


def test_a_channel_that_does_not_exist_names_the_channels(
    ome_tiff: Path, tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _correct(ome_tiff, tmp_path / "out", tiny_weights, "--channel", "Cy5") == 2

    message = _one_error(capsys)
    assert "'Cy5'" in message and "'DAPI', 'GFP'" in message
    assert not (tmp_path / "out").exists()


def test_an_output_folder_inside_the_input_is_refused(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = tmp_path / "raw.ome.zarr"
    data.write_ome_writers(dataset, data.frames_tpcz(1, 2, 1, 1))
    before = tree_digest(dataset)

    assert _correct(dataset, dataset / "corrected", tiny_weights) == 2

    assert "inside the dataset" in _one_error(capsys)
    assert tree_digest(dataset) == before


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (a tmpfs mounted ro): unwritable even for root, unlike a chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_is_refused(
    ome_tiff: Path, read_only_folder: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(ome_tiff)

    assert _correct(ome_tiff, read_only_folder / "out", tiny_weights) == 2

    assert f"--out {read_only_folder / 'out'}" in _one_error(capsys)
    assert tree_digest(ome_tiff) == before


def test_an_unknown_format_and_dataset_options_with_files_are_refused(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert _correct(tmp_path / "empty", tmp_path / "out", tiny_weights) == 2
    assert "BBBC layout" in _one_error(capsys)
    frames = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for i, path in enumerate(frames):
        tifffile.imwrite(path, data.frame(i))
    assert main(["correct", *map(str, frames), "--out", str(tmp_path / "out"), "--no-images"]) == 2
    assert "--no-images applies to a dataset" in _one_error(capsys)
    assert not (tmp_path / "out").exists()
    assert np.array_equal(tifffile.imread(frames[0]), data.frame(0))


def test_a_scheduler_that_is_not_there_is_a_clear_error(
    ome_tiff: Path, tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = free_tcp_address()  # nothing listens there

    assert _correct(ome_tiff, tmp_path / "out", tiny_weights, "--scheduler", address) == 2

    message = _one_error(capsys)
    assert f"--scheduler {address}: cannot reach a Dask scheduler" in message and "dask scheduler" in message
    assert not (tmp_path / "out" / "focus.parquet").exists()
