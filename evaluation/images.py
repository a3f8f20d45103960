"""Reading image folders into ComfyUI's layout, whatever the file's mode, and pairing folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..guidance.image_files import pil_to_rgb_array, to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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
    arr = to_uint8(image)
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
