"""`acquire-refocus demo` with z-stacks: the error with and without correction is measured on the same planes, and
the stack centres get a line of their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from acquire_refocus.cli import main
from acquire_refocus.config import PROJECT_ROOT

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_with_the_loop_off_a_z_stack_demo_reads_the_same_error_with_and_without_correction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Mode off moves nothing, so "with" and "without" must agree: before, each plane's +-1 um counted as error
    with the correction but not without it (1.71 against 1.55 um in a black-box run)."""
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "simulator.yaml").read_text(encoding="utf-8"))
    config["acquisition"]["sequence"].update({"z_plan": {"range": 2, "step": 1}, "axis_order": "tpz"})
    path = tmp_path / "zstack.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    args = ["demo", "--config", str(path), "--output", str(tmp_path / "demo"), "--loops", "2", "--mode", "off"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "12 acquired" in out
    planes = re.search(r"focus error RMS\s+([\d.]+) um focus mode off, ([\d.]+) um without", out)
    centres = re.search(r"stack centre RMS\s+([\d.]+) um focus mode off, ([\d.]+) um without", out)
    assert planes is not None and centres is not None, out
    assert planes.group(1) == planes.group(2) and centres.group(1) == centres.group(2)
    assert float(centres.group(1)) < float(planes.group(1))  # the planes' own +-1 um are not in the centres' figure
    assert "where the loop held the z-stacks' centres" in out
