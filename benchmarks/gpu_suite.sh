#!/usr/bin/env bash
# The one GPU benchmark (issue 17): anyone with a GPU runs it as it is, from the repository root or anywhere:
#
#   bash benchmarks/gpu_suite.sh            # sets up, builds or reuses the full-size SD 1.5-layout checkpoint
#                                           # (2.3 GB, random weights, cached), runs, prints one Markdown table
#   bash benchmarks/gpu_suite.sh --dry      # the same script on the tiny checkpoint at 64²: checks it runs (CPU ok)
#
# The table is also written to benchmarks/results/gpu-suite-<date>-<gpu>.md for the README to quote. Other options
# go to benchmarks/gpu_suite.py (--skip key-e,difp,dynamic-vram; --key-e-reference-steps 6100; --out FILE).
# Budget: 8 minutes on one H100/H200 (a first run adds the set-up and the checkpoint build: a few minutes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/setup_env.sh"
if ! "$DP_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && [[ " $* " != *" --dry "* ]]; then
  echo "[gpu_suite] no CUDA GPU visible to torch: run with --dry to check the script on a CPU" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# gpu_suite.py builds the full-size checkpoint on first use (cached outside the clone), before any timing.
exec bash "$DP_REPO/scripts/dev.sh" python "$DP_REPO/benchmarks/gpu_suite.py" "$@"
