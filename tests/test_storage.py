"""Refocused OME-Zarr store, focus log and run record: real files, read back with zarr / ome-zarr."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import useq
import zarr

from acquire_refocus.pipeline import FrameInfo, FrameResult
from acquire_refocus.storage import (
    FOCUS_LOG_COLUMNS,
    FocusLog,
    RefocusedStore,
    open_stores,
    read_focus_log,
    write_run_record,
)

pytestmark = pytest.mark.timeout(120)

SEQUENCE = useq.MDASequence(
    time_plan={"interval": 0, "loops": 3}, stage_positions=[(0, 0, 100), (50, 0, 100)], axis_order="tp"
)
SHAPE = (64, 96)


def results(sequence: useq.MDASequence) -> list[FrameResult]:
    out = []
    for frame, event in enumerate(sequence):
        raw = np.full(SHAPE, frame, np.uint16)
        skipped = frame == 3
        out.append(
            FrameResult(
                frame=frame,
                raw=raw,
                info=FrameInfo(
                    {k: int(v) for k, v in event.index.items()}, 100.0 + frame, (0.0, 0.0), 1e9 + frame, 0.3
                ),
                status="skipped" if skipped else "refocused",
                image=None if skipped else raw.astype(np.float32) + 0.5,
                defocus_um=math.nan if skipped else 0.1 * frame,
                confidence=math.nan if skipped else 0.9,
                latency_ms=3.0,
            )
        )
    return out


def test_refocused_store_matches_the_raw_layout_in_any_resolution_order(tmp_path: Path) -> None:
    store = RefocusedStore(tmp_path / "refocused.ome.zarr", SEQUENCE, SHAPE, pixel_size_um=0.325)
    frames = results(SEQUENCE)
    # the pipeline resolves skipped frames at once and queued ones later: deliver out of order
    for index in (3, 0, 2, 1, 5, 4):
        store.on_frame(frames[index])
    store.close()
    series = open_stores(tmp_path)["refocused"]
    assert sorted(series) == ["0", "1"]  # one image per position, like pymmcore-plus's raw store
    assert series["0"].shape == (3, *SHAPE) and series["0"].dtype == np.float32
    # axis order tp: frame = 2 * t + p
    for frame in range(6):
        t, p = divmod(frame, 2)
        plane = series[str(p)][t]
        expected = 0.0 if frame == 3 else frame + 0.5
        assert np.all(plane == expected), frame
    assert store.frames_written == 5 and store.frames_empty == 1
    # OME-NGFF metadata a viewer needs
    group = zarr.open_group(str(tmp_path / "refocused.ome.zarr" / "0"), mode="r")
    axes = [a["name"] for a in group.attrs["ome"]["multiscales"][0]["axes"]]
    assert axes == ["t", "y", "x"]


def test_refocused_store_bounds_the_writes_in_flight(tmp_path: Path) -> None:
    """ome-writers' tensorstore backend writes asynchronously and would keep every write's future until close;
    the store waits for the oldest once MAX_UNCOMMITTED_FRAMES are in flight and lets go of finished ones."""
    from acquire_refocus.storage import MAX_UNCOMMITTED_FRAMES

    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 60})
    store = RefocusedStore(tmp_path / "refocused.ome.zarr", sequence, (256, 256))
    rng = np.random.default_rng(0)
    kept = []
    for frame, event in enumerate(sequence):
        image = rng.random((256, 256), dtype=np.float32)
        store.on_frame(
            FrameResult(
                frame=frame,
                raw=image,
                info=FrameInfo(dict(event.index), 100.0, None, 0.0, None),
                status="refocused",
                image=image,
            )
        )
        kept.append(len(store._write_futures() or []))  # noqa: SLF001 - the bound lives on the backend's private list
        assert store.pending_writes is not None and store.pending_writes <= MAX_UNCOMMITTED_FRAMES
    store.close()
    assert max(kept) <= MAX_UNCOMMITTED_FRAMES
    written = open_stores(tmp_path)["refocused"]["0"]
    assert written.shape == (60, 256, 256) and np.all(written[59] == image)


def test_focus_log_one_flushed_row_per_frame(tmp_path: Path) -> None:
    log = FocusLog(tmp_path / "focus.csv")
    frames = results(SEQUENCE)
    for result in frames[:2]:
        log.on_frame(result)
    # flushed per row: readable before close
    rows = read_focus_log(tmp_path / "focus.csv")
    assert [r["frame"] for r in rows] == [0, 1]
    for result in frames[2:]:
        log.on_frame(result)
    log.close()
    header = (tmp_path / "focus.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == FOCUS_LOG_COLUMNS
    rows = read_focus_log(tmp_path / "focus.csv")
    assert len(rows) == 6
    assert rows[3]["refocused"] is False and math.isnan(rows[3]["defocus_um"])
    assert rows[4]["refocused"] is True and rows[4]["defocus_um"] == pytest.approx(0.4)
    assert rows[5]["axes"] == {"t": 2, "p": 1} and rows[5]["stage_z_um"] == 105.0


def test_run_record_is_replaced_atomically(tmp_path: Path) -> None:
    write_run_record(tmp_path / "run.json", {"state": "running"})
    write_run_record(tmp_path / "run.json", {"state": "completed", "counts": {"seen": 3}})
    assert '"completed"' in (tmp_path / "run.json").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_kill_9_leaves_readable_stores(tmp_path: Path) -> None:
    """A process killed with SIGKILL while writing: metadata and every finished frame stay readable."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_storage import SEQUENCE, SHAPE, results
        from acquire_refocus.storage import FocusLog, RefocusedStore
        out = sys.argv[1]
        store = RefocusedStore(out + "/refocused.ome.zarr", SEQUENCE, SHAPE)
        log = FocusLog(out + "/focus.csv")
        for r in results(SEQUENCE)[:4]:
            store.on_frame(r)
            log.on_frame(r)
        time.sleep(1.0)  # the writer's background commits of finished frames
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    series = open_stores(tmp_path)["refocused"]
    assert series["0"].shape == (3, *SHAPE)
    assert np.all(series["0"][0] == 0.5) and np.all(series["1"][0] == 1.5) and np.all(series["0"][1] == 2.5)
    assert np.all(series["1"][1] == 0.0)  # frame 3 was skipped
    assert np.all(series["0"][2] == 0.0)  # never acquired
    assert [r["frame"] for r in read_focus_log(tmp_path / "focus.csv")] == [0, 1, 2, 3]


def test_an_event_the_acquisition_never_took_leaves_its_plane_empty(tmp_path: Path) -> None:
    """Placement by useq index: the frame of event 3 never came (the acquisition skipped it), so the frames after
    it still land in their own planes and plane 3 stays at the fill value."""
    store = RefocusedStore(tmp_path / "refocused.ome.zarr", SEQUENCE, SHAPE, pixel_size_um=0.325)
    taken = [r for r in results(SEQUENCE) if r.frame != 3]
    for frame, result in enumerate(taken):  # the pipeline numbers the frames it saw: 0 .. 4
        store.on_frame(
            FrameResult(
                frame=frame,
                raw=result.raw,
                info=result.info,
                status="refocused",
                image=result.raw.astype(np.float32) + 0.5,
            )
        )
    store.close()
    series = open_stores(tmp_path)["refocused"]
    for event in range(6):
        t, p = divmod(event, 2)
        expected = 0.0 if event == 3 else event + 0.5
        assert np.all(series[str(p)][t] == expected), event
    assert store.frames_written == 5 and store.frames_empty == 1


def test_acquisition_slots_follow_useq_order_without_listing_the_events() -> None:
    from acquire_refocus.storage import _AcquisitionSlots, _axes_key

    stack = useq.MDASequence(
        time_plan={"interval": 0, "loops": 3},
        stage_positions=[(0, 0, 0), (1, 1, 1)],
        channels=["DAPI", "FITC"],
        z_plan={"range": 2, "step": 1},
        axis_order="tpcz",
    )
    slots = _AcquisitionSlots.for_sequence(stack)
    assert slots is not None and slots.count == 36
    assert [slots.slot(_axes_key(e.index)) for e in stack] == list(range(36))
    assert slots.slot((("c", 0), ("p", 0), ("t", 3), ("z", 0))) is None  # no such time point
    assert slots.slot((("p", 0), ("t", 0))) is None  # not this sequence's axes
    # a day at 10 frames a second on 2 positions: listing its events first would take minutes
    day = useq.MDASequence(time_plan={"interval": 0.1, "loops": 864_000}, stage_positions=[(0, 0, 0), (1, 1, 1)])
    long_slots = _AcquisitionSlots.for_sequence(day)
    assert long_slots is not None and long_slots.slot((("p", 1), ("t", 863_999))) == 1_727_999
    # channels that skip time points are not a full nest: placed in acquisition order instead
    every_other = useq.MDASequence(
        time_plan={"interval": 0, "loops": 3}, channels=[{"config": "DAPI"}, {"config": "FITC", "acquire_every": 2}]
    )
    assert _AcquisitionSlots.for_sequence(every_other) is None
