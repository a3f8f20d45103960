#!/usr/bin/env bash
# The README's test command. On a fresh machine it installs everything (scripts/setup_env.sh: the
# Python environment and the ComfyUI 0.3.75 host, cached outside the clone), then runs the whole
# suite: unit tests in-process, and workflows in a real ComfyUI server it starts and stops.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k schedule`, or test files to run only those).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$DP_REPO"
# The front-end tests drive ComfyUI's real web UI in headless Chromium: install it where we can.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[diff-privacy setup] installing Chromium (Debian package) for the front-end tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
    echo "[diff-privacy setup] could not install Chromium: the front-end tests will say so" >&2
fi
# Two busy torch threads on a 2-core machine slow small convolutions a hundredfold; the server
# and the in-process tests each get one.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Paths among the arguments (tests/test_x.py, tests/test_x.py::name) replace the default: the whole tests/.
targets=(tests)
for arg in "$@"; do
  case "$arg" in tests/*|*.py|*.py::*) targets=(); break ;; esac
done
exec "$DP_PYTHON" -m pytest -p no:cacheprovider -rs --durations=15 "${targets[@]}" "$@"
