#!/usr/bin/env bash
# Create (or reuse) .venv in the project root and install acquire-refocus into it.
# Sourced by tools/demo.sh and tools/test.sh; safe to run again (pip skips what is already there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ACQUIRE_REFOCUS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build. On a scope PC with a GPU,
# set ACQUIRE_REFOCUS_TORCH (e.g. "torch==2.13.0 --index-url <your CUDA wheel index>") or install torch
# into the venv yourself beforehand; an installed torch is kept.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing ${ACQUIRE_REFOCUS_TORCH:-torch==2.13.0}"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q ${ACQUIRE_REFOCUS_TORCH:-torch==2.13.0}
fi
stamp="$venv/.acquire-refocus-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "setup: installing acquire-refocus and its dependencies into $venv"
    "$venv/bin/python" -m pip install -q -e "$root[test${ACQUIRE_REFOCUS_EXTRAS:+,$ACQUIRE_REFOCUS_EXTRAS}]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
