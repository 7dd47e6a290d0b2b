#!/usr/bin/env bash
# The main job on built-in data: set up .venv if needed, generate datasets in the real formats,
# train the classifier, SSDLite and LR-ASPP through the real CLI, evaluate them with the real
# evaluation scripts, and print metric + latency. Extra arguments go to scripts/demo.py
# (e.g. --tasks detect --out outputs/demo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec .venv/bin/python scripts/demo.py "$@"
