"""Output paths are checked before any work: a wrong one is one clear message, and no data file is replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquire_refocus.cli import main
from acquire_refocus.errors import UserError
from acquire_refocus.outputs import json_output_file, output_folder

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_output_folder_is_created_or_refused(tmp_path: Path) -> None:
    assert output_folder(tmp_path / "a" / "b", "--out").is_dir()
    a_file = tmp_path / "image.tif"
    a_file.write_bytes(b"data")
    with pytest.raises(UserError, match="is a file, not a folder"):
        output_folder(a_file, "--out")
    with pytest.raises(UserError, match="cannot create the folder"):
        output_folder(a_file / "sub", "--out")
    assert a_file.read_bytes() == b"data"


def test_json_output_must_be_a_json_file_in_an_existing_folder(tmp_path: Path) -> None:
    assert json_output_file(tmp_path / "r.json") == tmp_path / "r.json"
    for path, message in [
        (tmp_path / "stack.tif", "ending in .json"),
        (tmp_path / "missing" / "r.json", "does not exist"),
    ]:
        with pytest.raises(UserError, match=message):
            json_output_file(path)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        json_output_file(tmp_path / "d.json")


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--out", "{file}/sub", "--fields", "1", "--defocus-um=0"],
        ["evaluate", "--out", "{file}", "--fields", "1"],
        ["benchmark", "--parts", "simulator", "--json", "{file}"],
        ["build-engine", "--backend", "onnxruntime", "--config", "{config}"],
    ],
    ids=["simulate-under-a-file", "evaluate-into-a-file", "benchmark-json-onto-an-image", "engine-cache-is-a-file"],
)
def test_commands_refuse_an_unusable_output_before_working(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.ones((8, 8), np.uint16))
    before = image.read_bytes()
    config = tmp_path / "cache-is-a-file.yaml"
    config.write_text(f"engine:\n  cache_dir: {image}\n", encoding="utf-8")
    assert main([a.replace("{file}", str(image)).replace("{config}", str(config)) for a in args]) == 2
    err = capsys.readouterr().err
    assert str(image) in err and "Traceback" not in err
    assert image.read_bytes() == before
