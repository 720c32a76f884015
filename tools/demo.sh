#!/usr/bin/env bash
# One command, no hardware: set up the environment, then run the closed-loop demo on the simulated microscope.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/setup_env.sh"
cd "$root"
exec acquire-refocus demo "$@"
