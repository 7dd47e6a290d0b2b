#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install the project editable with its dev extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it reinstalls only when
# pyproject.toml changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
STAMP=.venv/.mbv3-dense-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "[setup] installing mbv3-dense and its dependencies into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]'
    touch "$STAMP"
fi
