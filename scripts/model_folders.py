"""Where dev scripts and benchmarks make the pack look for its model files.

The pack finds its models (facenet/, insightface/, lpips/) through ComfyUI's ``folder_paths`` when that
is importable, and through ``$DIFFPRIVACY_MODELS_DIR`` when it is not. Under scripts/dev.sh the host's
``folder_paths`` is importable (its ``models/`` is the throw-away host's), so a script given a models
folder points both at it.
"""
from __future__ import annotations

import os
from pathlib import Path

PACK_FOLDERS = ("facenet", "insightface", "lpips")


def use_models_folder(models: str | Path) -> Path:
    """Make the pack look for its model files in ``models`` (a ComfyUI-style models folder) only."""
    models = Path(models).resolve()
    os.environ["DIFFPRIVACY_MODELS_DIR"] = str(models)
    try:
        import folder_paths
    except ImportError:  # plain-torch use outside ComfyUI: the pack reads DIFFPRIVACY_MODELS_DIR
        return models
    folder_paths.models_dir = str(models)
    for name in PACK_FOLDERS:
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], set())
    return models
