"""`acquire-refocus evaluate` end to end on a tiny test set: tables, targets, CSV and plots are written."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from support import FAST_SIMULATOR

from acquire_refocus.config import parse_config
from acquire_refocus.model.evaluate import run_evaluation
from acquire_refocus.model.report import stage_note


def test_evaluation_writes_report_csv_and_plots(tmp_path: Path, tiny_weights: Path) -> None:
    torch.set_num_threads(1)
    config = parse_config({"simulator": FAST_SIMULATOR, "engine": {"num_threads": 1}})
    report = run_evaluation(
        config,
        [("tiny net", tiny_weights)],
        tmp_path,
        fields=1,
        window_px=128,
        distances_um=(10.0, 2.0),
        tilt_distances_um=(2.0,),
    )
    text = report.read_text()
    for heading in (
        "## PSNR (dB) per |defocus|",
        "## SSIM per |defocus|",
        "## Defocus estimate",
        "## Unseen setting: tilted sample",
        "## Targets",
    ):
        assert heading in text
    for method in ("input (unprocessed)", "Richardson-Lucy, true PSF", "Wiener, true PSF", "tiny net"):
        assert f"| {method}" in text
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    flat = [r for r in rows if r["setting"] == "flat"]
    assert {float(r["defocus_um"]) for r in flat} == {-10.0, -2.0, 2.0, 10.0}
    # input, RL, the network as the daemon runs it (with engine.physics_fusion) and alone, at +-2 um
    assert len([r for r in rows if r["setting"] == "tilt"]) == 2 * 4
    assert {r["method"] for r in rows} >= {"tiny net", "tiny net, network alone"}
    assert all(r["estimate_um"] for r in rows if r["method"] == "tiny net")
    assert (tmp_path / "defocus_scatter.png").stat().st_size > 0 and (tmp_path / "examples.png").stat().st_size > 0


def test_two_models_under_one_label_are_refused(tmp_path: Path, capsys: object, restore_logging: object) -> None:
    from acquire_refocus.cli import main

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read: the labels are checked first")
    code = main(
        ["evaluate", "--out", str(tmp_path / "report"), "--weights", f"a={weights}", "--weights", f"a={weights}"]
    )
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert code == 2 and "the label(s) a name more than one model" in err
    assert not (tmp_path / "report").exists()


def test_the_networks_line_names_every_recorded_training_stage() -> None:
    stage1 = {"steps": 4112, "batch_size": 8, "patch_size_px": 128, "wall_time_s": 1920.0}
    stage2 = {
        "steps": 3172,
        "batch_size": 8,
        "patch_size_px": 256,
        "wall_time_s": 727.0,
        "train_only": "focus_head",
        "initial_weights": {"sha256": "a" * 64, "training": stage1},
    }
    stage3 = {"train_only": "decoder", "initial_weights": {"sha256": "b" * 64, "training": stage2}}
    note = stage_note(stage3)
    assert note == (
        " (image decoder only), starting from weights sha256 bbbbbbbbbbbbbbbb... trained 3172 steps "
        "(batch 8, 256 px patches) in 12.1 min (focus head only), starting from weights sha256 "
        "aaaaaaaaaaaaaaaa... trained 4112 steps (batch 8, 128 px patches) in 32.0 min"
    )
    assert stage_note(stage1) == ""


def test_the_command_tests_a_narrow_training_range_over_its_own_distances(
    tmp_path: Path, tiny_weights: Path, restore_logging: object
) -> None:
    """A config trained over +-6 um (a high-NA preset) is evaluated at the default distances scaled by 6/35:
    34 um becomes 5.83 um, not 34 um where every frame would be haze."""
    import yaml

    from acquire_refocus.cli import main
    from acquire_refocus.model.evaluate import DEFAULT_DISTANCES_UM

    config = tmp_path / "narrow.yaml"
    settings = {"simulator": FAST_SIMULATOR, "engine": {"num_threads": 1}, "training": {"defocus_range_um": [-6, 6]}}
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    out = tmp_path / "report"
    arguments = ["--fields", "1", "--size-px", "64", "--no-baselines", "--no-tilt", "--out", str(out)]
    assert main(["evaluate", "--config", str(config), "--weights", f"tiny={tiny_weights}", *arguments]) == 0
    with (out / "metrics.csv").open() as handle:
        distances = {abs(float(r["defocus_um"])) for r in csv.DictReader(handle)}
    assert distances == {round(d * 6 / 35, 2) for d in DEFAULT_DISTANCES_UM}


def test_the_ood_suite_scores_only_the_sets_asked_for(
    tmp_path: Path, tiny_weights: Path, capsys: object, restore_logging: object
) -> None:
    """`--set beads` scores the bead set alone, on the frames the whole suite would give it; a name that matches no
    set, a --set without --suite ood, and --record with a part of the suite are refused before any work."""
    from acquire_refocus.cli import main
    from acquire_refocus.model.ood import build_sets, select_sets

    out = tmp_path / "beads"
    common = ["--weights", f"tiny={tiny_weights}", "--fields", "1", "--size-px", "64", "--no-baselines"]
    assert main(["evaluate", "--suite", "ood", "--set", "Beads", "--out", str(out), *common]) == 0
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["set"] for r in rows} == {"beads (one plane)"} and len(rows) == 2 * 15  # fused and alone
    whole = build_sets(parse_config({}), 1, 64, (0.0, 1.0), seed=0)
    photons = select_sets(whole, ["nuclei, peak"])
    assert list(photons) == [name for name in whole if name.startswith("nuclei, peak")] and len(photons) == 5
    assert select_sets(whole, ["beads"])["beads (one plane)"] is whole["beads (one plane)"]
    capsys.readouterr()  # type: ignore[attr-defined]

    for arguments, message in (
        (["--suite", "ood", "--set", "plankton"], "no set is named 'plankton'; the sets: simulator nuclei;"),
        (["--set", "beads"], "--set picks sets of the out-of-distribution suite"),
        (["--suite", "ood", "--set", "beads", "--record"], "--record needs the whole suite"),
    ):
        refused = tmp_path / "refused"
        assert main(["evaluate", *arguments, "--out", str(refused), *common]) == 2
        assert message in capsys.readouterr().err  # type: ignore[attr-defined]
        assert not refused.exists()
