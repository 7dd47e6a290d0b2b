#!/usr/bin/env bash
# Set up .venv if needed, then run the linter and the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
.venv/bin/ruff check .
# OpenMP threads that spin while waiting stall 2-thread runs on a busy machine (docs/known_traps.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python -m pytest -q "$@"
