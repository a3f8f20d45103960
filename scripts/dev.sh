#!/usr/bin/env bash
# Runs a command inside the project's environment: `bash scripts/dev.sh python scripts/make_workflows.py`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$DP_REPO"
cmd="$1"; shift
[ "$cmd" = python ] && cmd="$DP_PYTHON"
exec "$cmd" "$@"
