"""Where dev scripts and benchmarks make the pack look for its model files.

The pack finds its models (facenet/, insightface/, lpips/) through ComfyUI's ``folder_paths`` when that
is importable, and through ``$DIFFPRIVACY_MODELS_DIR`` when it is not. Under scripts/dev.sh the host's
``folder_paths`` is importable (its ``models/`` is the throw-away host's), so a script given a models
folder points both at it.
"""
from __future__ import annotations

from diffprivacy.guidance.weights import PACK_FOLDERS, use_models_folder

__all__ = ["PACK_FOLDERS", "use_models_folder"]
