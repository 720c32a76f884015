"""The verdict per distance (helps / neutral / harms), its record beside the weights, and `evaluate --stack` on a
z-stack written to disk from the simulated microscope, as a user's would be."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquire_refocus.cli import main
from acquire_refocus.errors import UserError
from acquire_refocus.model.stack_eval import evaluate_stack, per_distance, stack_ranges
from acquire_refocus.model.verdict import (
    RangeVerdict,
    check_model,
    file_sha256,
    overall,
    range_verdicts,
    record_evaluation,
    record_path,
    recorded_evaluations,
    verdict,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("restore_logging")]

Z_STEP_UM = 1.0
Z_UM = np.arange(-4.0, 4.01, Z_STEP_UM)
IN_FOCUS_INDEX = 4


@pytest.fixture(scope="module")
def stack(small_field_scope: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 9-plane z-stack (1 um apart, in focus at plane 4) of one 128 px field, as a multi-page TIFF, and the
    simulator's noiseless in-focus image of it."""
    planes, truth = small_field_scope.render_stack(  # type: ignore[attr-defined]
        list(Z_UM), (130.0, 130.0), rng=np.random.default_rng(3), shape_px=(128, 128)
    )
    path = tmp_path_factory.mktemp("stack") / "nuclei.tif"
    tifffile.imwrite(path, planes)
    return path, truth


def test_thresholds_of_the_verdict() -> None:
    assert verdict(1.0) == "helps" and verdict(0.99) == "neutral"
    assert verdict(-0.3) == "neutral" and verdict(-0.31) == "harms"
    with pytest.raises(ValueError, match="NaN"):
        verdict(math.nan)


def test_neighbouring_distances_with_one_verdict_form_a_range() -> None:
    gains = {0.0: math.nan, 0.5: -1.2, 1.0: -0.4, 2.0: 0.2, 3.0: 1.5, 5.0: 3.0, 8.0: 0.9}
    ranges = range_verdicts(gains)
    assert ranges == [
        RangeVerdict(0.5, 1.0, "harms", -1.2, -0.4),
        RangeVerdict(2.0, 2.0, "neutral", 0.2, 0.2),
        RangeVerdict(3.0, 5.0, "helps", 1.5, 3.0),
        RangeVerdict(8.0, 8.0, "neutral", 0.9, 0.9),
    ]
    assert ranges[0].line() == "0.5-1 um: harms (-1.20 to -0.40 dB)"
    assert overall(ranges) == "harms" and overall(ranges[1:]) == "helps" and overall(ranges[1:2]) == "neutral"


def test_a_record_holds_every_evaluation_and_is_ignored_once_the_weights_change(
    tiny_weights: Path, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "mine.pt"
    shutil.copy(tiny_weights, weights)
    sha256 = file_sha256(weights)
    helps = [RangeVerdict(1.0, 4.0, "helps", 1.2, 3.0)]
    harms = [RangeVerdict(0.5, 0.5, "harms", -0.8, -0.8), RangeVerdict(1.0, 3.0, "helps", 1.1, 2.0)]
    assert record_evaluation(weights, sha256, "heldout", "simulated", helps) == tmp_path / "mine.pt.evaluation.json"
    assert check_model(weights, sha256, False, "opt in").refusal is None
    record_evaluation(weights, sha256, "stack: a.tif", "my stack", harms)
    recorded = recorded_evaluations(weights, sha256)
    assert recorded is not None and set(recorded) == {"heldout", "stack: a.tif"}
    assert recorded["stack: a.tif"].verdict == "harms" and recorded["heldout"].ranges == tuple(helps)
    check = check_model(weights, sha256, False, "set the opt-in")
    assert check.verdict == "harms" and check.refusal is not None
    assert "stack: a.tif: 0.5 um: harms (-0.80 dB)" in check.refusal and check.refusal.endswith("set the opt-in")
    allowed = check_model(weights, sha256, True, "set the opt-in")
    assert allowed.verdict == "harms" and allowed.refusal is None
    # other weights under the same name: the verdict is stale, ignored (and logged), and a new record starts afresh
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert recorded_evaluations(weights, file_sha256(weights)) is None
    assert "model_evaluation_stale" in engine_log.text
    record_evaluation(weights, file_sha256(weights), "heldout", "simulated", helps)
    assert set(json.loads(record_path(weights).read_text())["evaluations"]) == {"heldout"}


def test_a_damaged_record_is_one_clear_message(tiny_weights: Path, tmp_path: Path) -> None:
    weights = tmp_path / "mine.pt"
    shutil.copy(tiny_weights, weights)
    record_path(weights).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"not a readable evaluation record.*delete it"):
        check_model(weights, file_sha256(weights), False, "")


def test_the_shipped_model_is_recorded_in_the_user_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    path = record_path(DEFAULT_WEIGHTS)
    assert path.is_relative_to(tmp_path) and path.name == "shipped-default.pt.evaluation.json"


def test_the_stack_score_is_zero_for_a_model_that_changes_nothing_and_positive_for_the_truth(
    stack: tuple[Path, np.ndarray],
) -> None:
    """Identity: exactly 0 dB at every distance (neutral). Returning the noiseless in-focus image: a gain at every
    distance, which the noisy reference makes smaller than against the noiseless truth (the README's caveat)."""
    path, truth = stack
    planes = tifffile.imread(path)
    fields = [("field", planes)]
    identity = per_distance(evaluate_stack(fields, Z_UM, lambda frame: (frame.astype(np.float32), 0.0)))
    assert [s.distance_um for s in identity] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert math.isnan(identity[0].gain_db) and identity[0].frames == 1
    assert all(s.gain_db == 0.0 and s.frames == 2 for s in identity[1:])
    assert [r.verdict for r in stack_ranges(identity)] == ["neutral"]
    assert identity[3].magnitude_error_um == 3.0  # reads 0 um at 3 um

    perfect = per_distance(evaluate_stack(fields, Z_UM, lambda frame: (truth, 0.0)))
    against_truth = per_distance(
        evaluate_stack(
            [("truth", np.concatenate([planes[:IN_FOCUS_INDEX], truth[None], planes[IN_FOCUS_INDEX + 1 :]]))],
            Z_UM,
            lambda frame: (truth, 0.0),
        )
    )
    for noisy, exact in zip(perfect[1:], against_truth[1:], strict=True):
        assert 0 < noisy.gain_db < exact.gain_db
    assert perfect[-1].gain_db >= 1.0  # 4 um out (1.3 depths of field): the truth helps against the noisy plane


def test_evaluate_stack_prints_a_table_and_verdict_writes_the_report_and_records_it(
    stack: tuple[Path, np.ndarray], tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = stack
    weights = tmp_path / "tiny.pt"
    shutil.copy(tiny_weights, weights)
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--stack",
            str(path),
            "--z-step-um",
            str(Z_STEP_UM),
            "--in-focus-index",
            str(IN_FOCUS_INDEX),
            "--pixel-size-um",
            "0.325",
            "--weights",
            f"tiny={weights}",
            "--out",
            str(out),
            "--record",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    table = printed.split("tiny on z-stack", 1)[1]
    for distance in ("0.00", "1.00", "2.00", "3.00", "4.00"):
        assert f"\n     {distance} " in table
    assert "(reference)" in table and "verdict per |defocus|" in printed
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(Z_UM) and {r["model"] for r in rows} == {"tiny"}
    gains = {float(r["z_um"]): float(r["psnr_gain_db"]) for r in rows}
    assert math.isnan(gains[0.0]) and all(math.isfinite(g) for z, g in gains.items() if z != 0)
    report = (out / "report.md").read_text()
    assert "noisy frame" in report and "## tiny" in report and (out / "stack_tiny.png").stat().st_size > 5000
    record = json.loads((tmp_path / "tiny.pt.evaluation.json").read_text())
    assert record["weights_sha256"] == file_sha256(weights)
    [(name, evaluation)] = record["evaluations"].items()
    assert name == f"stack: {path.resolve()}"
    # the untrained network's verdict, as the table judged it distance by distance
    judged = {float(r["z_um"]): float(r["psnr_gain_db"]) for r in rows}
    expected = range_verdicts({d: float(np.mean([judged[d], judged[-d]])) for d in (1.0, 2.0, 3.0, 4.0)})
    recorded = [RangeVerdict(**r) for r in evaluation["ranges"]]
    assert [(r.from_um, r.to_um, r.verdict) for r in recorded] == [(r.from_um, r.to_um, r.verdict) for r in expected]
    assert [r.min_gain_db for r in recorded] == pytest.approx([r.min_gain_db for r in expected], abs=2e-3)
    assert evaluation["verdict"] == overall(expected)
    assert f"verdict recorded: {tmp_path / 'tiny.pt.evaluation.json'}" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--suite", "ood"], "give one"),
        ([], "say which plane is in focus with --in-focus-index"),
        (["--in-focus-index", "9"], "the stack has planes 0 .. 8"),
    ],
)
def test_stack_arguments_that_cannot_work_are_refused(
    stack: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    path, _ = stack
    code = main(["evaluate", "--stack", str(path), "--z-step-um", "1", "--out", str(tmp_path / "r"), *extra])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["heldout", "ood"])
def test_the_simulated_suites_end_with_the_same_verdict_lines_and_record_them(
    suite: str, tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml
    from support import FAST_SIMULATOR

    weights = tmp_path / "tiny.pt"
    shutil.copy(tiny_weights, weights)
    config = tmp_path / "scope.yaml"
    config.write_text(yaml.safe_dump({"simulator": FAST_SIMULATOR, "engine": {"num_threads": 1}}), encoding="utf-8")
    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--suite",
                suite,
                "--config",
                str(config),
                "--weights",
                f"tiny={weights}",
                "--out",
                str(out),
                "--fields",
                "1",
                "--size-px",
                "64",
                "--no-baselines",
                "--no-tilt",
                "--record",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "harms (< -0.3 dB)" in report
    evaluations = json.loads((tmp_path / "tiny.pt.evaluation.json").read_text())["evaluations"]
    if suite == "heldout":
        assert list(evaluations) == ["heldout"]
    else:
        assert {"ood: simulator nuclei", "ood: real nuclei (DSB 2018)", "ood: nuclei, peak 20 photons"} <= set(
            evaluations
        )
    for evaluation in evaluations.values():
        title = f"tiny, {evaluation['source']}: "
        assert title in printed and title in report
        for r in evaluation["ranges"]:
            assert RangeVerdict(**r).line() in printed
