#!/usr/bin/env bash
# Set up .venv if needed, then run the linter and the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
