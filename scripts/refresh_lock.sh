#!/usr/bin/env bash
# Moves the test environment's pins, deliberately: builds a fresh environment from the newest versions the ranges of
# requirements.txt / requirements-test.txt (and ComfyUI 0.3.75's requirements) allow, runs the whole suite on it, and
# rewrites requirements-lock.txt only when the suite passes. Run it when you want newer packages (a security fix, a
# new torch), not to make CI green: a red run leaves the lock as it was and prints what failed.
#
#   bash scripts/refresh_lock.sh            # extra arguments go to pytest, as with scripts/test.sh
#
# The environment is built in a throw-away cache folder (nothing of the locked environment is touched) and takes a
# few minutes plus one run of the suite. Commit the new requirements-lock.txt with the change that needed it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$(mktemp -d "${TMPDIR:-/tmp}/diffprivacy-refresh.XXXXXX")"
export DIFFPRIVACY_CACHE="$cache" DIFFPRIVACY_UNLOCKED=1
echo "[refresh-lock] resolving afresh in $cache" >&2
if ! bash "$repo/scripts/test.sh" "$@"; then
  echo "[refresh-lock] the suite failed on the newest versions: requirements-lock.txt is unchanged." >&2
  echo "[refresh-lock] bound the package that broke in requirements*.txt (with a comment why), then run this again." >&2
  exit 1
fi
source "$repo/scripts/setup_env.sh"
new="$repo/requirements-lock.txt.new"
{
  grep '^#' "$repo/requirements-lock.txt"
  "$DP_PYTHON" -m pip list --format=freeze --disable-pip-version-check | sort -f
} > "$new"
mv "$new" "$repo/requirements-lock.txt"
echo "[refresh-lock] requirements-lock.txt rewritten from a green run; review 'git diff requirements-lock.txt' and commit." >&2
rm -rf "$cache"
