#!/usr/bin/env bash
# The README's run command: a ComfyUI 0.3.75 with this pack and its example workflows, on
# http://127.0.0.1:8188. Everything is set up on first use (scripts/setup_env.sh).
#
#   bash scripts/run.sh                          # models in $DIFFPRIVACY_HOME/models (default ~/diffprivacy-comfyui)
#   bash scripts/run.sh --models /path/to/ComfyUI/models      # use an existing ComfyUI's model folders
#   bash scripts/run.sh --extra-model-paths my_paths.yaml     # or an extra_model_paths.yaml
# Other arguments go to ComfyUI's main.py (e.g. --port 8189).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

home="${DIFFPRIVACY_HOME:-$HOME/diffprivacy-comfyui}"
mkdir -p "$home/custom_nodes" "$home/models" "$home/input" "$home/output" "$home/user"
ln -sfn "$DP_REPO" "$home/custom_nodes/diff-privacy-nodes"

comfy_args=()
models_yaml=()
models_dir="$home/models"  # where the missing-model hints point: the user's folder when --models gives one
port=8188
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --models) models_dir="$(realpath "$2")"
              # every folder the pack reads (scripts/check_models.py FOLDERS) mapped to $2/<folder>/
              "$DP_PYTHON" "$DP_REPO/scripts/check_models.py" --write-yaml "$home/extra_model_paths.yaml" "$models_dir"
              models_yaml=(--extra-model-paths-config "$home/extra_model_paths.yaml"); shift 2 ;;
    --extra-model-paths) models_yaml=(--extra-model-paths-config "$(realpath "$2")"); shift 2 ;;
    *) comfy_args+=("$1"); shift ;;
  esac
done

"$DP_PYTHON" "$DP_REPO/scripts/check_models.py" "$models_dir" "$home/models" "${models_yaml[@]:1}" || true
echo "[diff-privacy] folders: models $models_dir (and $home/models), photos in $home/input," \
  "results and keys in $home/output (keys under diffprivacy/)"

if ! "$DP_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[diff-privacy] no GPU found: running on the CPU (slow; fine for trying the workflows on small images)"
  comfy_args+=(--cpu)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
fi
echo "[diff-privacy] open http://127.0.0.1:$port (workflows: the ComfyUI logo menu > Browse Templates, or the" \
  "Templates button of the left bar; then diff-privacy-nodes under Extensions; start with anonymize-text-key)"
cd "$DP_COMFY"
exec "$DP_PYTHON" main.py --base-directory "$home" --listen 127.0.0.1 --port "$port" \
  --database-url "sqlite:///$home/user/comfyui.db" "${models_yaml[@]}" "${comfy_args[@]}"
