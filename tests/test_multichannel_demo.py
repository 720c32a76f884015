"""`acquire-refocus demo --config configs/simulator-multichannel.yaml`: the shipped two-channel demo runs and its
summary measures the focus error on the frames of the channel that drives the loop; and a second demo may replace
everything the first wrote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from acquire_refocus.cli import main
from acquire_refocus.commands.demo import DEMO_MARKER, prepare_output
from acquire_refocus.config import PROJECT_ROOT
from acquire_refocus.storage import FOCUS_LOG, read_focus_log

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_two_channel_demo_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    config = PROJECT_ROOT / "configs" / "simulator-multichannel.yaml"
    assert main(["demo", "--config", str(config), "--output", str(tmp_path / "demo"), "--loops", "3"]) == 0
    out = capsys.readouterr().out
    assert "18 acquired, 9 refocused, 9 skipped (9 of them of channels kept raw: pipeline.channels), 0 failed" in out
    assert re.search(
        r"focus error RMS\s+[\d.]+ um with correction, [\d.]+ um without correction \(depth of field "
        r"3\.00 um; frames of channel Nuclei, which drives the loop\)",
        out,
    )
    assert re.search(r"per position\s+p0 [\d.]+ um, p1 [\d.]+ um, p2 [\d.]+ um", out)
    rows = read_focus_log(tmp_path / "demo" / FOCUS_LOG)
    assert len(rows) == 18 and {r["axes"]["c"] for r in rows} == {0, 1}
    assert all(r["status"] == ("refocused" if r["axes"]["c"] == 0 else "skipped") for r in rows)

    # Every file the demo wrote is one a later demo may replace (raw_frames.jsonl once was not: a second
    # `bash tools/demo.sh` was refused as "not a previous demo's output").
    prepare_output(tmp_path / "demo")
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [DEMO_MARKER]
