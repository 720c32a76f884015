"""acquire_refocus.sequence: an event's axes as a plain dict, and a client that checks a sequence file without
loading the daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import useq

from acquire_refocus.sequence import axes_dict, event_axes, nested_event_count, parse_sequence


def test_axes_are_plain_strings_and_ints() -> None:
    sequence = parse_sequence(
        {"time_plan": {"interval": 0, "loops": 2}, "stage_positions": [{"x": 0, "y": 0}], "axis_order": "tp"}
    )
    events = list(sequence)
    assert nested_event_count(sequence) == len(events) == 2
    assert event_axes(events[1]) == {"t": 1, "p": 0}
    axes = axes_dict({useq.Axis.TIME: 3, "c": 1})
    assert axes == {"t": 3, "c": 1} and all(type(key) is str for key in axes)


def test_run_command_checks_a_sequence_without_importing_the_daemon(tmp_path: Path) -> None:
    bad = tmp_path / "seq.yaml"
    bad.write_text("time_plan: {interval: 0, loops: 2}\nstage_positionz: []\n", encoding="utf-8")
    script = (
        "import sys\n"
        "from acquire_refocus.cli import main\n"
        f"code = main(['run', {str(bad)!r}, '--address', 'tcp://127.0.0.1:9'])\n"
        "assert code == 2, code\n"
        "heavy = ('acquire_refocus.daemon', 'acquire_refocus.storage', 'torch')\n"
        "loaded = sorted(m for m in sys.modules if m in heavy)\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "unknown key(s) stage_positionz" in done.stderr  # the misspelt key is named
    assert done.stdout.strip() == "[]"
