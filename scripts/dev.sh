#!/usr/bin/env bash
# Runs a command inside the project's environment: `bash scripts/dev.sh python scripts/make_workflows.py`.
#
# The one way scripts and benchmarks import the pack: as the package `diffprivacy`, found through
# build/import-root/diffprivacy (a link to this clone, whatever its folder is called), with the
# host's `comfy`, the test fixtures (tests/) and the dev-script modules (scripts/) on PYTHONPATH.
# Scripts then write plain `from diffprivacy.evaluation.report import ...`; none of them edits sys.path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$DP_REPO"
mkdir -p build/import-root
ln -sfn "$DP_REPO" build/import-root/diffprivacy
export PYTHONPATH="$DP_COMFY:$DP_REPO/build/import-root:$DP_REPO/tests:$DP_REPO/scripts${PYTHONPATH:+:$PYTHONPATH}"
cmd="$1"; shift
[ "$cmd" = python ] && cmd="$DP_PYTHON"
exec "$cmd" "$@"
