"""`correct DATASET` on a real LocalCluster of 2 worker processes, for every supported format written with its real
writer: every frame's table row and refocused plane match calling the Refocuser directly on that frame."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import reprocess_data as data
import yaozarrs
import zarr

from acquire_refocus.cli import main

pytestmark = pytest.mark.usefixtures("restore_logging")

SHAPE_TPCZ = (2, 2, 2, 2)


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """A LocalCluster of 2 worker processes, 1 thread each, reached through --scheduler."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def correct(dataset: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(
        [
            "correct",
            str(dataset),
            "--out",
            str(out),
            "--weights",
            str(weights),
            "--engine",
            "torch",
            "--batch-frames",
            "3",
            *extra,
        ]
    )


def check_against_refocuser(
    out: Path,
    frames: Callable[[dict[str, Any]], np.ndarray],
    groups: Callable[[dict[str, Any]], tuple[str, tuple[int, ...]]],
    refocuser: Any,
    expected_rows: int,
) -> None:
    yaozarrs.validate_zarr_store(out / "refocused.ome.zarr")  # valid OME-NGFF, as napari expects
    rows = pq.read_table(out / "focus.parquet").to_pylist()
    assert len(rows) == expected_rows
    for row in rows:
        assert row["status"] == "refocused", row
        expected = refocuser(frames(row), pixel_size_um=data.PIXEL_SIZE_UM)
        assert row["defocus_um"] == pytest.approx(expected.defocus_um, abs=1e-4)
        assert row["defocus_magnitude_um"] == pytest.approx(expected.defocus_magnitude_um, abs=1e-4)
        assert row["confidence"] == pytest.approx(expected.confidence, abs=1e-4)
        group, index = groups(row)
        plane = zarr.open_array(str(out / "refocused.ome.zarr"), mode="r", path=f"{group}/0".strip("/"))[index]
        np.testing.assert_allclose(plane, expected.image, rtol=1e-4, atol=1e-2)


def test_daemon_raw_store_on_the_embedded_cluster(
    tmp_path: Path, tiny_weights: Path, tiny_refocuser: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    source = data.frames_tpcz(*SHAPE_TPCZ)
    raw = tmp_path / "run1" / "raw.ome.zarr"
    data.write_ome_writers(raw, source)
    before = tree_digest(raw)

    assert correct(raw, tmp_path / "out", tiny_weights, "--workers", "2", "--csv") == 0

    assert "16 refocused, 0 failed, 0 skipped" in capsys.readouterr().out
    check_against_refocuser(
        tmp_path / "out",
        lambda r: source[r["t"], r["p"], r["c"], r["z"]],
        lambda r: (str(r["p"]), (r["t"], r["c"], r["z"])),
        tiny_refocuser,
        16,
    )
    assert tree_digest(raw) == before
    root = zarr.open_group(str(tmp_path / "out" / "refocused.ome.zarr"), mode="r")
    assert root.attrs["ome"]["bioformats2raw.layout"] == 3
    image = zarr.open_group(str(tmp_path / "out" / "refocused.ome.zarr"), mode="r", path="1").attrs["ome"]
    assert [a["name"] for a in image["multiscales"][0]["axes"]] == ["t", "c", "z", "y", "x"]
    assert image["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1] == data.PIXEL_SIZE_UM
    assert [c["label"] for c in image["omero"]["channels"]] == list(data.CHANNELS)
    assert (tmp_path / "out" / "focus.csv").read_text().startswith('"t","p","c","z","position","channel"')

    assert main(["qc", str(tmp_path / "out"), "--threshold-um", "0.1"]) == 0  # the report of a time-lapse
    qc = tmp_path / "out" / "qc"
    assert "trace.png" in (qc / "report.md").read_text() and (qc / "trace.png").stat().st_size > 0
    assert len((qc / "reimage.csv").read_text().splitlines()) == 1 + 16  # every frame is above 0.1 um
    assert not (qc / "plate.png").exists()  # positions of a time-lapse are not a plate


@pytest.mark.parametrize("fmt", ["ome-zarr-v0.4", "ndtiff", "ome-tiff"])
def test_each_format_on_a_cluster_matches_the_refocuser(
    fmt: str, tmp_path: Path, tiny_weights: Path, tiny_refocuser: Any, cluster_address: str
) -> None:
    source = data.frames_tpcz(*SHAPE_TPCZ)
    if fmt == "ome-zarr-v0.4":
        dataset = tmp_path / "image.ome.zarr"
        data.write_ome_zarr_v04(dataset, source)  # one position, chunks of 2 z-planes
        frames = lambda r: source[r["t"], 0, r["c"], r["z"]]  # noqa: E731 - one-line accessors chosen per layout
        groups = lambda r: ("", (r["t"], r["c"], r["z"]))  # noqa: E731 - one-line accessors chosen per layout
        expected_rows = 8
    else:
        dataset = tmp_path / ("acq" if fmt == "ndtiff" else "stack.ome.tif")
        (data.write_ndtiff if fmt == "ndtiff" else data.write_ome_tiff)(dataset, source)
        frames = lambda r: source[r["t"], r["p"], r["c"], r["z"]]  # noqa: E731 - one-line accessors chosen per layout
        groups = lambda r: (str(r["p"]), (r["t"], r["c"], r["z"]))  # noqa: E731 - one-line accessors chosen per layout
        expected_rows = 16
    before = tree_digest(dataset)

    assert correct(dataset, tmp_path / "out", tiny_weights, "--scheduler", cluster_address) == 0

    check_against_refocuser(tmp_path / "out", frames, groups, tiny_refocuser, expected_rows)
    assert tree_digest(dataset) == before
    if fmt == "ome-zarr-v0.4":
        array = zarr.open_array(str(tmp_path / "out" / "refocused.ome.zarr"), mode="r", path="0")
        assert array.chunks == (1, 1, 2, data.FRAME_PX, data.FRAME_PX) and array.dtype == np.float32


def test_bbbc_plate_with_a_truncated_file_and_one_channel(
    tmp_path: Path, tiny_weights: Path, tiny_refocuser: Any, cluster_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "plate"
    files = data.write_bbbc_folder(folder, ["A01", "A02", "B01"], sites=2, channels=2)
    broken = files[("A02", 2, 0)]
    broken.write_bytes(broken.read_bytes()[:3000])
    before = tree_digest(folder)

    code = correct(folder, tmp_path / "out", tiny_weights, "--scheduler", cluster_address, "--channel", "w1", "--qc")

    assert code == 2
    captured = capsys.readouterr()
    assert "1 frame(s) could not be refocused" in captured.err and "Traceback" not in captured.err
    rows = pq.read_table(tmp_path / "out" / "focus.parquet").to_pylist()
    assert len(rows) == 12
    store = tmp_path / "out" / "refocused.ome.zarr"
    yaozarrs.validate_zarr_store(store)
    plate = zarr.open_group(str(store), mode="r").attrs["ome"]["plate"]
    assert [w["path"] for w in plate["wells"]] == ["A/01", "A/02", "B/01"]
    by_key = {(r["well"], r["site"], r["channel"]): r for r in rows}
    assert by_key[("A02", 2, "w1")]["status"] == "failed" and "cannot be read" in by_key[("A02", 2, "w1")]["reason"]
    assert {r["status"] for r in rows if r["channel"] == "w2"} == {"skipped"}
    for (well, site, channel), file in files.items():
        row = by_key[(well, site, f"w{channel + 1}")]
        if channel == 0 and file != broken:
            expected = tiny_refocuser(
                data.frame(list(files).index((well, site, channel))), pixel_size_um=data.PIXEL_SIZE_UM
            )
            assert row["status"] == "refocused" and row["defocus_um"] == pytest.approx(expected.defocus_um, abs=1e-4)
            field = zarr.open_array(str(store), mode="r", path=f"{well[0]}/{well[1:]}/{site - 1}/0")
            np.testing.assert_allclose(field[0], expected.image, rtol=1e-4, atol=1e-2)
            assert not field[1].any()  # w2 was not chosen: its plane stays empty
    assert tree_digest(folder) == before
    report = (tmp_path / "out" / "qc" / "report.md").read_text()
    assert "plate.png" in report and "worst.png" in report
    for name in ("plate.png", "histogram.png", "worst.png", "reimage.csv"):
        assert (tmp_path / "out" / "qc" / name).stat().st_size > 0


def test_an_ome_zarr_plate_is_read_as_a_plate(
    tmp_path: Path, tiny_weights: Path, tiny_refocuser: Any, cluster_address: str
) -> None:
    """An HCS plate in OME-Zarr (here the refocused store of a BBBC folder, written by this command)."""
    folder = tmp_path / "plate"
    data.write_bbbc_folder(folder, ["A01", "B03"], sites=2, channels=1)
    assert correct(folder, tmp_path / "first", tiny_weights, "--scheduler", cluster_address) == 0
    plate = tmp_path / "first" / "refocused.ome.zarr"

    assert correct(plate, tmp_path / "second", tiny_weights, "--scheduler", cluster_address) == 0

    rows = pq.read_table(tmp_path / "second" / "focus.parquet").to_pylist()
    assert [(r["well"], r["site"]) for r in rows] == [("A01", 0), ("A01", 1), ("B03", 0), ("B03", 1)]
    yaozarrs.validate_zarr_store(tmp_path / "second" / "refocused.ome.zarr")
    for row in rows:
        group = f"{row['well'][0]}/{row['well'][1:]}/{row['site']}"
        source = zarr.open_array(str(plate), mode="r", path=f"{group}/0")[0]
        expected = tiny_refocuser(np.asarray(source), pixel_size_um=data.PIXEL_SIZE_UM)
        assert row["defocus_um"] == pytest.approx(expected.defocus_um, abs=1e-4)
