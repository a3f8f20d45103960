"""Reading image folders into ComfyUI's layout, whatever the file's mode, and pairing folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def pil_to_rgb_array(img) -> np.ndarray:
    """A Pillow image in any mode -> (H, W, 3) float32 in [0, 1].

    16-bit and 32-bit integer modes (``I;16``, ``I``) are scaled by their real range, float
    mode ``F`` is taken as [0, 1] when it fits, alpha is dropped (the pixels under it are kept,
    as ComfyUI's LoadImage does), palettes and CMYK are converted.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak, 0.0, 1.0)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        arr = np.clip(arr, 0.0, 1.0)
    else:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(arr[..., None], 3, axis=2).astype(np.float32)


def load_image(path: str | Path) -> torch.Tensor:
    """One image file -> (H, W, 3) float tensor in [0, 1]. Raises ``ValueError`` when unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            arr = pil_to_rgb_array(img)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot read image {Path(path).name}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(arr))


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """(H, W, 3) float [0, 1] -> 8-bit file (format from the suffix; JPEG at quality 95)."""
    from PIL import Image
    arr = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    path = Path(path)
    kwargs = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(arr).save(path, **kwargs)


def list_images(folder: str | Path) -> dict[str, Path]:
    """Image files under ``folder``, sub-folders included (as the dataset command writes them), keyed by their
    relative path ("img1.jpg", "sub/img2.jpg"), sorted; hidden files and folders are left out. ``ValueError`` when
    not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(x.startswith(".") for x in rel.parts):
            found[rel.as_posix()] = p
    return found


def pair_names(originals: dict[str, Path], others: dict[str, Path]) -> tuple[dict[str, str], list[str], list[str]]:
    """Match files of two folders: by exact name, else by name without extension.

    Returns (original name -> other name, originals without a partner, others without one);
    a protected ``img1.png`` pairs with an original ``img1.jpg``.
    """
    pairs: dict[str, str] = {}
    by_stem: dict[str, list[str]] = {}
    for name in others:
        by_stem.setdefault(str(Path(name).with_suffix("")), []).append(name)
    used: set[str] = set()
    for name in originals:
        if name in others:
            pairs[name] = name
        else:
            cands = [c for c in by_stem.get(str(Path(name).with_suffix("")), []) if c not in originals]
            if len(cands) == 1:
                pairs[name] = cands[0]
        if name in pairs:
            used.add(pairs[name])
    missing = [n for n in originals if n not in pairs]
    extra = [n for n in others if n not in used]
    return pairs, missing, extra


def match_size(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize (H, W, 3) ``image`` to ``like``'s size (bicubic, antialiased) when they differ."""
    if image.shape == like.shape:
        return image
    import torch.nn.functional as F
    x = image.permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x, size=like.shape[:2], mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).clamp(0, 1)
