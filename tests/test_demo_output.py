"""`acquire-refocus demo --output DIR`: only a previous demo's own files are ever removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from acquire_refocus.cli import main
from acquire_refocus.commands.demo import DEMO_MARKER, prepare_output
from acquire_refocus.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _previous_demo(folder: Path) -> None:
    """The files a finished demo leaves, marker included."""
    for store in ("raw.ome.zarr", "refocused.ome.zarr"):
        (folder / store / "0").mkdir(parents=True)
        (folder / store / "0" / "zarr.json").write_text("{}")
    for name in ("focus.csv", "run.json", "focus_trace.png", "raw_frames.jsonl", DEMO_MARKER):
        (folder / name).write_text(name)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() if p.is_file() else "<dir>" for p in folder.rglob("*")}


@pytest.mark.parametrize("state", ["new", "empty"])
def test_new_or_empty_output_gets_the_marker(tmp_path: Path, state: str) -> None:
    output = tmp_path / "parent" / "demo"
    if state == "empty":
        output.mkdir(parents=True)

    prepare_output(output)

    assert [p.name for p in output.iterdir()] == [DEMO_MARKER]


def test_previous_demo_is_cleared(tmp_path: Path) -> None:
    output = tmp_path / "demo"
    output.mkdir()
    _previous_demo(output)
    (output / "run.json.tmp").write_text("left by a crash")

    prepare_output(output)

    assert [p.name for p in output.iterdir()] == [DEMO_MARKER]


def test_a_link_among_demo_files_is_removed_but_not_what_it_points_to(tmp_path: Path) -> None:
    data = tmp_path / "precious.ome.zarr"
    (data / "0").mkdir(parents=True)
    (data / "0" / "chunk").write_text("raw frames")
    output = tmp_path / "demo"
    output.mkdir()
    (output / DEMO_MARKER).write_text("")
    (output / "raw.ome.zarr").symlink_to(data, target_is_directory=True)

    prepare_output(output)

    assert (data / "0" / "chunk").read_text() == "raw frames"
    assert [p.name for p in output.iterdir()] == [DEMO_MARKER]


@pytest.mark.parametrize("extra", ["serve run without marker", "user file beside a demo"])
def test_other_folders_are_refused_and_kept(tmp_path: Path, extra: str) -> None:
    output = tmp_path / "data"
    output.mkdir()
    if extra == "serve run without marker":
        (output / "raw.ome.zarr" / "0").mkdir(parents=True)
        (output / "raw.ome.zarr" / "0" / "chunk").write_text("raw frames")
        (output / "run.json").write_text("{}")
    else:
        _previous_demo(output)
        (output / "notes.txt").write_text("the user's notes")
    before = _snapshot(output)

    with pytest.raises(UserError, match="is not a previous demo's output; choose another --output"):
        prepare_output(output)

    assert _snapshot(output) == before


def test_demo_refuses_a_serve_run_folder_without_deleting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run-1"
    (output / "raw.ome.zarr" / "0").mkdir(parents=True)
    (output / "raw.ome.zarr" / "0" / "chunk").write_text("raw frames")
    (output / "run.json").write_text("{}")
    before = _snapshot(output)

    assert main(["demo", "--output", str(output), "--loops", "1"]) == 2

    assert "is not a previous demo's output" in capsys.readouterr().err
    assert _snapshot(output) == before


@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_demo_output_that_cannot_be_a_folder_is_a_clear_error(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("the user's notes")
    output = blocker if where == "existing file" else blocker / "demo"

    assert main(["demo", "--output", str(output), "--loops", "1"]) == 2

    error = capsys.readouterr().err
    assert "acquire-refocus demo: error:" in error and "choose another --output" in error
    assert "Traceback" not in error
    assert blocker.read_text() == "the user's notes"


def test_a_demo_refused_for_its_focus_settings_leaves_the_previous_demo_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """focus.hold: start with single planes is refused before the output folder is cleared."""
    config = yaml.safe_load((CONFIGS / "simulator.yaml").read_text(encoding="utf-8"))
    config["focus"]["hold"] = "start"
    path = tmp_path / "hold-start.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    output = tmp_path / "demo"
    output.mkdir()
    _previous_demo(output)
    before = _snapshot(output)

    assert main(["demo", "--config", str(path), "--output", str(output), "--loops", "1"]) == 2

    error = capsys.readouterr().err
    assert "needs a z_plan of 3 or more planes" in error and "Traceback" not in error
    assert _snapshot(output) == before
