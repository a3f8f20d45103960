"""Full-reference image metrics on [0, 1] images: MSE, RMSE, MAE, PSNR, SSIM (paper Table 2, DIFP).

Images are (H, W, 3) or ComfyUI batches (B, H, W, 3); batched inputs give one value per image.
PSNR uses peak 1 (the same number as peak 255 on 8-bit data) and is ``inf`` for identical images.
SSIM is Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, computed
per channel and averaged (skimage's ``structural_similarity(gaussian_weights=True)`` without
its sample-covariance correction).
"""
from __future__ import annotations

import math

import torch


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape to be compared, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.dim() != 4:
        raise ValueError(f"expected (H, W, C) or (B, H, W, C) images, got {tuple(a.shape)}")
    return a.double(), b.double()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _pair(a, b)
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


def rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return mse(a, b).sqrt()


def mae(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _pair(a, b)
    return (a - b).abs().mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE) in dB; ``inf`` where the images are identical."""
    m = mse(a, b)
    return torch.where(m > 0, 10.0 * torch.log10(1.0 / m.clamp_min(1e-300)),
                       torch.full_like(m, math.inf))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _valid_filter(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """'Valid' filtering of (..., H, W) maps by the separable kernel g g^T: one grouped 2-D
    convolution over all maps (on CPU several times faster than two 1-D passes)."""
    shape = t.shape
    m = t[..., 0, 0].numel()
    k = torch.outer(g, g).view(1, 1, g.numel(), g.numel()).repeat(m, 1, 1, 1)
    out = torch.nn.functional.conv2d(t.reshape(1, m, *shape[-2:]), k, groups=m)
    return out.view(*shape[:-2], *out.shape[-2:])


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    a, b = _pair(a, b)
    n, h, w, c = a.shape
    if min(h, w) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {(h, w)}")
    # float32 filtering (on [0, 1] data it agrees with a float64 reference to ~1e-6); the
    # 'valid' region only, as skimage crops the border of the SSIM map
    x = a.float().permute(0, 3, 1, 2)
    y = b.float().permute(0, 3, 1, 2)
    g = _gaussian_window(window, sigma).float()
    mx, my, xx, yy, xy = _valid_filter(torch.stack([x, y, x * x, y * y, x * y]), g)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.double().mean(dim=(1, 2, 3))


def all_pixel_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """MSE, RMSE, MAE, PSNR, SSIM of one image pair (H, W, 3) as plain floats."""
    return {"mse": float(mse(a, b)[0]), "rmse": float(rmse(a, b)[0]), "mae": float(mae(a, b)[0]),
            "psnr": float(psnr(a, b)[0]), "ssim": float(ssim(a, b)[0])}
