"""The package ships py.typed, so a user's own script that uses the public API must pass `mypy --strict`: the
README's Python API (Refocuser, RefocusResult), the client (Subscriber, control.request) and the pymmcore-plus
hook. The script is type-checked, not run; a wrong use must fail, or the check proves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300)]

USER_SCRIPT = """
from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pymmcore_plus import CMMCorePlus

from acquire_refocus import RefocusResult, Refocuser
from acquire_refocus.client import Subscriber
from acquire_refocus.control import request
from acquire_refocus.hooks.pymmcore_plus import PymmcorePlusHook
from acquire_refocus.pipeline import FramePipeline


def refocus(frame: npt.NDArray[np.uint16]) -> tuple[npt.NDArray[np.float32], float]:
    refocuser = Refocuser.load()
    out: RefocusResult = refocuser(frame, pixel_size_um=0.325)
    flags: tuple[str, ...] = out.flags
    move_um: float = -out.defocus_um if out.confidence > 0.5 and not flags else 0.0
    return out.image, move_um + out.defocus_magnitude_um * 0.0


def listen(address: str) -> int:
    frames = 0
    with Subscriber(address, topics=("focus",), timeout_s=1.0) as subscriber:
        message = subscriber.receive()
        if message is not None:
            header, pixels = message
            frames += int(header["frame"]) + (0 if pixels is None else pixels.size)
    reply = request("tcp://127.0.0.1:5557", "status", timeout_s=2.0)
    return frames + len(reply)


def hook(core: CMMCorePlus) -> None:
    pipeline = FramePipeline(Refocuser.load())
    with PymmcorePlusHook(core, pipeline, pixel_size_um=0.325):
        core.mda.run([])
"""


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for both checks: the second reuses the first's analysis of numpy, torch and the package."""
    return tmp_path_factory.mktemp("mypy-cache")


def run_mypy(folder: Path, source: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on a user's script, without the project's own mypy settings. The package is found through
    MYPYPATH (mypy cannot see through the editable install's import hook) and its own files are followed
    silently: their types are used, their internals are tools/lint.sh's business."""
    script = folder / "user_script.py"
    script.write_text(source, encoding="utf-8")
    (folder / "mypy.ini").write_text("[mypy]\n", encoding="utf-8")
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "--follow-imports", "silent"]
    return subprocess.run(
        [*command, "--config-file", str(folder / "mypy.ini"), str(script)],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "MYPYPATH": str(REPOSITORY)},
    )


def test_a_user_script_on_the_public_api_passes_mypy_strict(tmp_path: Path, mypy_cache: Path) -> None:
    done = run_mypy(tmp_path, USER_SCRIPT, mypy_cache)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wrong_use_of_the_public_api_is_caught(tmp_path: Path, mypy_cache: Path) -> None:
    """The check is real: a string where the API takes a number, and a field RefocusResult does not have."""
    wrong = USER_SCRIPT.replace("pixel_size_um=0.325)", 'pixel_size_um="0.325")').replace(
        "out.defocus_magnitude_um * 0.0", "out.defocus_size_um * 0.0"
    )
    done = run_mypy(tmp_path, wrong, mypy_cache)
    assert done.returncode == 1
    assert 'Argument "pixel_size_um"' in done.stdout and '"RefocusResult" has no attribute "defocus_size_um"' in (
        done.stdout
    )
