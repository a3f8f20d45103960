"""Reading weight files the one safe way: safetensors (recognised by its header, whatever the file is called),
anything else only through ``torch.load(weights_only=True)``, so a pickle that needs code to load is refused and its
code never runs."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def read_tensor_file(path: str | Path, hint: str = "") -> dict:
    """The file's dict of tensors (possibly nested, as ``.bin`` files hold them); ValueError with ``hint`` appended
    (what file was expected) when it is not one."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then a JSON header
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}. {hint}") from e
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as plain tensors with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e)[:200]}): it may be a pickle that needs code to load, which is "
                         f"never run. {hint}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of tensors. {hint}")
    return data


PACK_FOLDERS = ("facenet", "insightface", "lpips")


def use_models_folder(models: str | Path) -> Path:
    """Make the pack look for its model files in ``models`` (a ComfyUI-style models folder) only: through
    ComfyUI's ``folder_paths`` when it is importable, and ``$DIFFPRIVACY_MODELS_DIR`` (what plain-torch use reads)."""
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
