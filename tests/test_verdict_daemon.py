"""What a recorded verdict does: the daemon (simulated microscope through the real Micro-Manager core, real ZeroMQ
sockets, real files) keeps every frame raw when the model is recorded to harm, unless the user opts in; `correct`
refuses to write refocused images from it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq
from support import SEQUENCE, Collector, daemon_config, written_planes

from acquire_refocus.cli import main
from acquire_refocus.control import request
from acquire_refocus.daemon import Daemon
from acquire_refocus.model.verdict import RangeVerdict, file_sha256, record_evaluation
from acquire_refocus.storage import open_stores, read_focus_log

pytestmark = [pytest.mark.timeout(180)]

HARMS = [RangeVerdict(0.5, 1.0, "harms", -2.1, -0.6), RangeVerdict(2.0, 8.0, "helps", 1.4, 3.2)]
FRAMES = 8


@pytest.fixture
def harmful_weights(tiny_weights: Path, tmp_path: Path) -> Path:
    """The tiny network under a name of its own, recorded to harm at 0.5-1 um on a z-stack."""
    weights = tmp_path / "weights" / "scope.pt"
    weights.parent.mkdir()
    shutil.copy(tiny_weights, weights)
    record_evaluation(weights, file_sha256(weights), "stack: nuclei.tif", "my stack", HARMS)
    return weights


def run_daemon(weights: Path, output: Path, **pipeline: Any) -> tuple[Any, Collector, dict[str, Any]]:
    config = daemon_config(weights, pipeline=pipeline)
    with Daemon(config, output_dir=output) as daemon:
        collector = Collector(daemon.publisher.address, expected=3 * FRAMES)  # type: ignore[union-attr]
        collector.thread.start()
        daemon.acquisition_core()
        summary = daemon.run(useq.MDASequence(**SEQUENCE), output)
        collector.thread.join(60)
        status = request(config.publishing.control_address, "status")
    return summary, collector, status


def test_a_model_recorded_to_harm_keeps_every_frame_raw_and_says_why(
    harmful_weights: Path, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    summary, collector, status = run_daemon(harmful_weights, tmp_path / "run")
    counts = summary.counts()
    assert counts["seen"] == FRAMES and counts["skipped"] == FRAMES and counts["refocused"] == 0
    assert not summary.error  # the raw data is complete: a withheld model is not a failed run
    stores = open_stores(tmp_path / "run")
    assert written_planes(stores["raw"]) == FRAMES and written_planes(stores["refocused"]) == 0
    rows = read_focus_log(tmp_path / "run" / "focus.csv")
    assert len(rows) == FRAMES and all(r["status"] == "skipped" and not r["refocused"] for r in rows)
    assert collector.topics() == {"raw": FRAMES, "focus": FRAMES}
    reasons = {h["reason"] for h in collector.headers}
    assert len(reasons) == 1
    [reason] = reasons
    assert "scope.pt.evaluation.json" in reason and "stack: nuclei.tif: 0.5-1 um: harms (-2.10 to -0.60 dB)" in reason
    assert "pipeline.allow_harmful_model: true" in reason
    verdict = status["model_verdict"]
    assert verdict["verdict"] == "harms" and verdict["refocused_frames_withheld"] == reason
    assert "refocused_frames=\"withheld: the model's recorded" in engine_log.text  # run_start


def test_opting_in_uses_the_harmful_model(
    harmful_weights: Path, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    summary, collector, status = run_daemon(harmful_weights, tmp_path / "run", allow_harmful_model=True)
    assert "refocused_frames=used" in engine_log.text
    assert summary.counts()["refocused"] == FRAMES
    assert collector.topics() == {"raw": FRAMES, "refocused": FRAMES, "focus": FRAMES}
    verdict = status["model_verdict"]
    assert verdict["verdict"] == "harms" and verdict["refocused_frames_withheld"] is None
    assert "used anyway (opted in)" in engine_log.text


def test_a_model_without_a_record_or_with_a_stale_one_is_used_and_the_log_says_so(
    harmful_weights: Path, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    harmful_weights.write_bytes(harmful_weights.read_bytes() + b"\0")  # other weights: the verdict is stale
    summary, _, status = run_daemon(harmful_weights, tmp_path / "run")
    assert summary.counts()["refocused"] == FRAMES
    assert status["model_verdict"]["verdict"] == "not evaluated"
    assert "event=model_evaluation_stale" in engine_log.text and 'verdict="not evaluated"' in engine_log.text


def test_correct_refuses_to_write_images_from_a_harmful_model_unless_allowed(
    harmful_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    frame = tmp_path / "frame.tif"
    tifffile.imwrite(frame, np.random.default_rng(0).integers(100, 400, (128, 128), dtype=np.uint16))
    refused = tmp_path / "refused"
    code = main(["correct", str(frame), "--weights", str(harmful_weights), "--out", str(refused), "--engine", "torch"])
    assert code == 2 and "--allow-harmful-model writes them anyway" in capsys.readouterr().err
    assert not refused.exists()
    allowed = tmp_path / "allowed"
    assert (
        main(
            [
                "correct",
                str(frame),
                "--weights",
                str(harmful_weights),
                "--out",
                str(allowed),
                "--engine",
                "torch",
                "--allow-harmful-model",
            ]
        )
        == 0
    )
    assert (allowed / "frame.tif").is_file()
