"""Where caches (ONNX exports, TensorRT engines, the simulator's PSF bank) live when the config does not say.

An installed package sits in site-packages: unwritable for a normal user and replaced on upgrade, so caches go
to the user's cache directory (platformdirs: ~/.cache/acquire-refocus on Linux, honouring $XDG_CACHE_HOME;
%LOCALAPPDATA%\\acquire-refocus\\Cache on Windows; ~/Library/Caches/acquire-refocus on macOS). A source checkout
keeps its engines in its own writable `trt_engines/` folder, as it always has.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_path

APP_NAME = "acquire-refocus"
_SOURCE_ENGINE_DIR = "trt_engines"


def user_cache_dir() -> Path:
    """The user's cache directory for this application (not created here)."""
    return user_cache_path(APP_NAME, appauthor=False)


def default_engine_cache_dir(project_root: Path) -> Path:
    """`<checkout>/trt_engines` in a writable source checkout, else `<user cache>/engines`.

    A checkout is recognised by its pyproject.toml beside the package and its trt_engines/ folder (committed with
    a README); an installed wheel has neither in site-packages.
    """
    source_dir = project_root / _SOURCE_ENGINE_DIR
    if (project_root / "pyproject.toml").is_file() and source_dir.is_dir() and os.access(source_dir, os.W_OK):
        return source_dir
    return user_cache_dir() / "engines"
