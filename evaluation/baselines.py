"""Classic anonymization baselines applied to detected face regions: Gaussian blur, pixelation
and mosaic (paper Fig. 3; thesis ch. 3). Plain torch on (H, W, 3) [0, 1] images.

Strengths are relative to the face box width, so a setting means the same on any resolution:
blur ``sigma_percent`` (Gaussian sigma in % of the face width), pixelation ``blocks`` (square
blocks across the face width) and mosaic ``cell_percent`` (irregular Voronoi tiles, each the mean
colour of its pixels, about this % of the face width apart: a tiled look unlike pixelation's
grid). The region is the face box grown by ``margin`` (a fraction of its size) on every side.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..guidance.face.base import choose_faces

METHODS = ("blur", "pixelate", "mosaic")
# Named strengths for scripts/make_baselines.py and the README table.
PRESETS = {
    "blur": {"weak": 2.0, "medium": 5.0, "strong": 10.0},      # sigma, % of face width
    "pixelate": {"weak": 24, "medium": 12, "strong": 6},      # blocks across the face
    "mosaic": {"weak": 4.0, "medium": 8.0, "strong": 16.0},   # tile spacing, % of face width
}


def face_region(box, shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Integer (x1, y1, x2, y2), exclusive end, of ``box`` grown by ``margin`` and clipped."""
    h, w = shape
    x1, y1, x2, y2 = [float(v) for v in box]
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    x1, y1 = max(0, int(math.floor(x1 - mx))), max(0, int(math.floor(y1 - my)))
    x2, y2 = min(w, int(math.ceil(x2 + mx))), min(h, int(math.ceil(y2 + my)))
    return x1, y1, x2, y2


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 3, h, w), reflect-padded (kernel clipped to small crops)."""
    k = _gaussian_kernel(sigma)
    r = (k.numel() - 1) // 2
    px, py = min(r, x.shape[-1] - 1), min(r, x.shape[-2] - 1)
    x = F.pad(x, (px, px, py, py), mode="reflect")
    kx, ky = k[r - px:r + px + 1], k[r - py:r + py + 1]
    x = F.conv2d(x, (kx / kx.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, (ky / ky.sum()).view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def blur_region(image: torch.Tensor, region, sigma: float) -> torch.Tensor:
    """Gaussian blur inside ``region``; pixels around it feed the blur but are left unchanged."""
    x1, y1, x2, y2 = region
    if sigma <= 0 or x2 <= x1 or y2 <= y1:
        return image
    r = int(math.ceil(3.0 * sigma))
    h, w = image.shape[:2]
    cx1, cy1, cx2, cy2 = max(0, x1 - r), max(0, y1 - r), min(w, x2 + r), min(h, y2 + r)
    crop = image[cy1:cy2, cx1:cx2].permute(2, 0, 1).unsqueeze(0).float()
    # A wide kernel is slow: blur a shrunk copy (box-filtered, so no aliasing) and scale it back;
    # at >= 4 shrunk pixels per sigma the difference is invisible.
    factor = max(1, int(sigma // 4))
    if factor > 1:
        small = F.avg_pool2d(crop, factor, stride=factor, ceil_mode=True)
        out = F.interpolate(_blur(small, sigma / factor), size=crop.shape[-2:], mode="bilinear",
                            align_corners=False)
    else:
        out = _blur(crop, sigma)
    out = out[0].permute(1, 2, 0)
    result = image.clone()
    result[y1:y2, x1:x2] = out[y1 - cy1:y2 - cy1, x1 - cx1:x2 - cx1].to(image.dtype)
    return result


def pixelate_region(image: torch.Tensor, region, block: int) -> torch.Tensor:
    """Replace ``region`` by square blocks of ``block`` pixels, each its mean colour."""
    x1, y1, x2, y2 = region
    if block <= 1 or x2 <= x1 or y2 <= y1:
        return image
    crop = image[y1:y2, x1:x2].permute(2, 0, 1).unsqueeze(0).float()
    h, w = crop.shape[-2:]
    small = F.avg_pool2d(crop, block, stride=block, ceil_mode=True, count_include_pad=False)
    big = F.interpolate(small, scale_factor=block, mode="nearest")[..., :h, :w]
    result = image.clone()
    result[y1:y2, x1:x2] = big[0].permute(1, 2, 0).to(image.dtype)
    return result


def mosaic_region(image: torch.Tensor, region, cell: float, seed: int = 0) -> torch.Tensor:
    """Voronoi mosaic inside ``region``: seeds on a jittered grid of spacing ``cell`` pixels,
    every pixel takes the mean colour of its nearest seed's tile. Deterministic for a ``seed``."""
    x1, y1, x2, y2 = region
    if cell <= 1 or x2 <= x1 or y2 <= y1:
        return image
    crop = image[y1:y2, x1:x2].float()
    h, w = crop.shape[:2]
    gh, gw = int(math.ceil(h / cell)), int(math.ceil(w / cell))
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(gh, gw, 2, generator=gen)
    gy, gx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    seeds = torch.stack([(gx + jitter[..., 0]) * cell, (gy + jitter[..., 1]) * cell], dim=-1)  # (gh, gw, 2)
    py, px = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    ci, cj = (py / cell).long(), (px / cell).long()
    best_d = torch.full((h, w), float("inf"))
    best_id = torch.zeros((h, w), dtype=torch.long)
    for di in (-1, 0, 1):  # a pixel's nearest jittered seed lies in its own or a neighbouring cell
        for dj in (-1, 0, 1):
            ni, nj = (ci + di).clamp(0, gh - 1), (cj + dj).clamp(0, gw - 1)
            s = seeds[ni, nj]
            d = (s[..., 0] - px) ** 2 + (s[..., 1] - py) ** 2
            better = d < best_d
            best_d = torch.where(better, d, best_d)
            best_id = torch.where(better, ni * gw + nj, best_id)
    flat = best_id.view(-1)
    sums = torch.zeros(gh * gw, 3).index_add_(0, flat, crop.reshape(-1, 3))
    counts = torch.zeros(gh * gw).index_add_(0, flat, torch.ones(flat.numel()))
    means = sums / counts.clamp_min(1).unsqueeze(1)
    result = image.clone()
    result[y1:y2, x1:x2] = means[flat].view(h, w, 3).to(image.dtype)
    return result


def apply_baseline(image: torch.Tensor, boxes, method: str, strength: float, margin: float = 0.2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Anonymize every box of ``image`` (H, W, 3) with ``method`` at ``strength`` (units above).

    Returns (image, mask (H, W) float, 1 inside the changed regions).
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {METHODS}")
    if strength <= 0:
        raise ValueError(f"{method} strength must be positive, got {strength}")
    out = image
    mask = torch.zeros(image.shape[:2], dtype=torch.float32)
    for box in boxes:
        region = face_region(box, image.shape[:2], margin)
        width = max(1.0, float(box[2]) - float(box[0]))
        if method == "blur":
            out = blur_region(out, region, strength / 100.0 * width)
        elif method == "pixelate":
            out = pixelate_region(out, region, max(2, int(round(width / strength))))
        else:
            out = mosaic_region(out, region, strength / 100.0 * width, seed)
        x1, y1, x2, y2 = region
        mask[y1:y2, x1:x2] = 1.0
    return out, mask


def cover_faces(face_model, image: torch.Tensor, method: str, strength: float, margin: float, faces: str,
                if_no_face: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a baseline to the faces of every image of an IMAGE batch (B, H, W, 3): (images, masks (B, H, W)).

    ``faces`` "all" or "largest"; ``if_no_face`` "pass through" (image unchanged, empty mask) or "error".
    """
    outs, masks = [], []
    for i, img in enumerate(image):
        found = face_model.detect(img)
        if not found and if_no_face == "pass through":
            outs.append(img)
            masks.append(torch.zeros(img.shape[:2]))
            continue
        chosen = choose_faces(found, "all" if faces == "all" else "largest", batch_index=i)
        out, mask = apply_baseline(img, [f.box for f in chosen], method, strength, margin, seed)
        outs.append(out)
        masks.append(mask)
    return torch.stack(outs), torch.stack(masks)
