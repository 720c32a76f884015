"""A regular (non-editable) install: build the wheel, install it into a fresh virtual environment, run `demo`
and `correct` from another working directory, and check that nothing is written inside the installed package
(caches go to the user's cache directory).

The fresh environment borrows the already installed dependencies (torch and the rest) through a .pth file
naming this environment's site-packages, so nothing is downloaded; only acquire-refocus itself is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquire_refocus.cache_dirs import default_engine_cache_dir, user_cache_dir
from acquire_refocus.config import PROJECT_ROOT

FileState = tuple[int, int]  # size in bytes, modification time in ns


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _snapshot(folder: Path) -> dict[str, FileState]:
    """Every file (and link) under `folder`, with its size and modification time."""
    state: dict[str, FileState] = {}
    for path in folder.rglob("*"):
        if path.is_file() or path.is_symlink():
            info = path.lstat()
            state[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return state


def _installed_venv(root: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a fresh venv holding the wheel built from this checkout."""
    wheel_dir = root / "wheel"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(wheel_dir),
            str(PROJECT_ROOT),
        ],
        cwd=root,
    )
    (wheel,) = wheel_dir.glob("acquire_refocus-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip()
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        cwd=root,
    )
    # the dependencies, from this environment: a plain path line (this site-packages' own .pth files, among
    # them the editable install's finder, are not processed, so the checkout stays invisible)
    (site_packages / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    return python, site_packages


def _field_tiff(path: Path) -> None:
    """A 256 x 256 uint16 frame with blobs on a background, enough structure for the network."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    image = np.full((256, 256), 100.0)
    for y, x in rng.uniform(20, 236, size=(30, 2)):
        image += 2000.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 6.0**2))
    tifffile.imwrite(path, rng.poisson(image).astype(np.uint16))


def test_engine_cache_is_the_checkouts_trt_engines_only_in_a_source_checkout(tmp_path: Path) -> None:
    assert default_engine_cache_dir(tmp_path) == user_cache_dir() / "engines"  # an installed package's parent
    (tmp_path / "trt_engines").mkdir()
    assert default_engine_cache_dir(tmp_path) == user_cache_dir() / "engines"  # no pyproject.toml: not a checkout
    (tmp_path / "pyproject.toml").write_text("[project]\n", encoding="utf-8")
    assert default_engine_cache_dir(tmp_path) == tmp_path / "trt_engines"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_install_runs_demo_and_correct_without_writing_into_the_package(tmp_path: Path) -> None:
    python, site_packages = _installed_venv(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    location = _run([str(python), "-c", "import acquire_refocus; print(acquire_refocus.__file__)"], cwd=work)
    package = Path(location.strip()).parent
    assert package == site_packages / "acquire_refocus"
    assert not (package.parent / "trt_engines").exists()

    cache = tmp_path / "user-cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HOME": str(tmp_path / "home"), "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    before = _snapshot(site_packages)
    command = str(python.parent / "acquire-refocus")

    demo_out = _run([command, "demo", "--output", "demo", "--loops", "2", "--mode", "observe"], cwd=work, env=env)
    assert "frames" in demo_out
    record = json.loads((work / "demo" / "run.json").read_text(encoding="utf-8"))
    assert record["state"] == "completed"

    _field_tiff(work / "field.tif")
    _run([command, "correct", "field.tif", "--out", "corrected"], cwd=work, env=env)
    assert (work / "corrected" / "field.tif").is_file()
    rows = (work / "corrected" / "defocus.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "file,defocus_um,confidence" and len(rows) == 2

    after = _snapshot(site_packages)
    added = sorted(set(after) - set(before))
    changed = sorted(name for name in set(before) & set(after) if before[name] != after[name])
    removed = sorted(set(before) - set(after))
    assert (added, changed, removed) == ([], [], [])
    assert sorted(p.name for p in work.iterdir()) == ["corrected", "demo", "field.tif"]
    # the caches went to the user's cache directory instead
    assert list((cache / "acquire-refocus" / "engines").glob("*.onnx"))
    assert list((cache / "acquire-refocus").glob("psf*"))
