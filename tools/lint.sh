#!/usr/bin/env bash
# Style and types: ruff (lint, then format check) and mypy --strict with the pydantic plugin, as configured in
# pyproject.toml. Runs every check and exits non-zero when any of them found something.
#   bash tools/lint.sh            all three
#   bash tools/lint.sh --stats    the same, with a count per rule / error code
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/setup_env.sh" || exit 1
set +e  # setup_env.sh sets -e: run every check, then say
cd "$root"
stats=false
[[ "${1:-}" == "--stats" ]] && stats=true
status=0

echo "== ruff check"
if $stats; then ruff check --statistics . || status=1; else ruff check . || status=1; fi

echo "== ruff format --check"
ruff format --check . || status=1

echo "== mypy (strict, pydantic plugin)"
mypy || status=1
if $stats; then
    mypy 2>/dev/null | grep -o '\[[a-z-]*\]$' | sort | uniq -c | sort -rn || true
fi
exit $status
