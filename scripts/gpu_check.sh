#!/usr/bin/env bash
# The GPU check (docs/training_at_scale.md): a few hundred bf16 steps of each task on generated data
# with the loss going down, the training benchmark in fp32 vs bf16, and the latency callback on CUDA.
# Sets up .venv if needed. At most ~8 minutes on one GPU.
#   bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --device cpu    # dry run on the CPU (what the tests run)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec .venv/bin/python scripts/gpu_check.py "$@"
