#!/usr/bin/env bash
# One command: set up the environment, then run the whole test suite (GPU tests skip without a GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/setup_env.sh"
cd "$root"
exec python -m pytest "$@"
