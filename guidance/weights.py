"""Reading weight files the one safe way: safetensors (recognised by its header, whatever the file is called),
anything else only through ``torch.load(weights_only=True)``, so a pickle that needs code to load is refused and its
code never runs. Every tensor read is checked for NaN and infinity (:func:`require_finite`, the one check the pack
applies to numbers wherever they enter: files, IMAGE inputs, embeddings, pools, number lists typed as text)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


_CHUNK = 1 << 24  # elements checked at once


def non_finite_count(value) -> int:
    """How many NaN / infinite numbers ``value`` holds (a tensor, a number, or a (nested) list / tuple / dict of
    them; integer and boolean tensors hold none)."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return 0
        if value.numel() > _CHUNK and value.dim() > 1:  # a large batch: one image at a time, not one huge mask
            return sum(non_finite_count(part) for part in value.unbind(0))
        try:
            return int((~torch.isfinite(value)).sum())
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor kind isfinite does not take (nested)
            return 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return 0 if math.isfinite(value) else 1
    if isinstance(value, dict):
        return sum(non_finite_count(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(non_finite_count(v) for v in value)
    return 0


def require_finite(value, what: str, advice: str = ""):
    """``value`` unchanged, or a ValueError naming ``what`` (an input, or a file and its tensor) when it holds NaN
    or infinity, with ``advice`` (what to do) after it. A NaN that enters unchecked ends as a black image that
    looks like success."""
    bad = non_finite_count(value)
    if bad:
        total = value.numel() if isinstance(value, torch.Tensor) else None
        count = f"{bad} of {total} values" if total is not None and total > 1 else f"{bad} value(s)"
        raise ValueError(f"{what} holds NaN or infinity ({count}); every number must be finite"
                         + (f": {advice}" if advice else ""))
    return value


DAMAGED = "the file is damaged or was saved from a diverged training run; download or export it again"


def _check_tensors(data, path: Path, advice: str, prefix: str = "") -> None:
    for name, value in data.items():
        if isinstance(value, dict):
            _check_tensors(value, path, advice, f"{prefix}{name}.")
        elif isinstance(value, torch.Tensor):
            require_finite(value, f"{path.name}: tensor '{prefix}{name}'", advice)


def read_tensor_file(path: str | Path, hint: str = "", damaged: str = "") -> dict:
    """The file's dict of tensors (possibly nested, as ``.bin`` files hold them); ValueError with ``hint`` appended
    (what file was expected) when it is not one, or when a tensor holds NaN or infinity (naming the tensor; then
    ``damaged`` says what to do, by default: get the file again)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise ValueError(f"{path.name} is empty (0 bytes): the download or copy did not finish. Put the complete "
                         f"file in its place (in {path.parent}). {hint}")
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then a JSON header
        from safetensors.torch import load_file
        try:
            data = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path.name} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}): "
                             f"it is damaged or truncated; download it again. {hint}") from e
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch's own text advises disabling the safety check: it is not passed on
            kind = ("it is damaged or truncated" if isinstance(e, (EOFError, RuntimeError)) and
                    "weights_only" not in str(e).lower() else
                    "it is a pickle that needs code to load (Python objects), and such code is never run here")
            raise ValueError(f"{path.name} is not a plain tensor file ({type(e).__name__}): {kind}. Use the "
                             f".safetensors release of this file (or one saved as plain tensors), or download it "
                             f"again. {hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors. {hint}")
    _check_tensors(data, path, damaged or f"{DAMAGED}. {hint}".strip())
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
