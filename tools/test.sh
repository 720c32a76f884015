#!/usr/bin/env bash
# One command: set up the environment, check style and types (tools/lint.sh: ruff, ruff format, mypy --strict),
# then run the whole test suite (GPU tests skip without a GPU). Any lint finding fails it before the tests run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/setup_env.sh"
cd "$root"
bash tools/lint.sh
exec python -m pytest "$@"
