"""Where results go: folders and files checked or created before any work starts, so a wrong path costs one clear
message (a UserError), not a traceback after minutes of work, and a data file given by mistake is never replaced."""

from __future__ import annotations

import os
from pathlib import Path

from acquire_refocus.errors import UserError


def output_folder(path: str | Path, option: str) -> Path:
    """Create `path` and its parents for writing; UserError naming `option` (e.g. "--out") when it cannot be."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: is a file, not a folder; choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{option} {folder}: cannot create the folder ({exc.strerror or exc}); choose another {option}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {folder}: the folder is not writable; choose another {option}")
    return folder


def json_output_file(path: str | Path, option: str = "--json") -> Path:
    """A JSON results file to write (an existing one is replaced): it must end in .json, so that an image or other
    data file named by mistake is never overwritten, and its folder must exist and be writable."""
    file = Path(path)
    if file.suffix.lower() != ".json":
        raise UserError(f"{option} {file}: give a file name ending in .json")
    if file.is_dir():
        raise UserError(f"{option} {file}: is a folder, not a file")
    if not file.parent.is_dir():
        raise UserError(f"{option} {file}: the folder {file.parent} does not exist")
    if not os.access(file.parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {file}: the folder {file.parent} is not writable")
    return file
