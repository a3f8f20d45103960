#!/usr/bin/env bash
# Runs a command inside the project's environment: `bash scripts/dev.sh python scripts/make_workflows.py`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$DP_REPO"
# Dev scripts and benchmarks import the host's `comfy` and the test fixtures from here (the pack never does).
export PYTHONPATH="$DP_COMFY:$DP_REPO/tests${PYTHONPATH:+:$PYTHONPATH}"
cmd="$1"; shift
[ "$cmd" = python ] && cmd="$DP_PYTHON"
exec "$cmd" "$@"
