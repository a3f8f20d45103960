"""A small loss-curve picture (PIL only: ComfyUI ships Pillow, not matplotlib)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 512, 256, 28


def smoothed(values, decay: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average (the per-step loss is very noisy: t is random)."""
    out, m = [], 0.0
    for i, v in enumerate(values, start=1):
        m = decay * m + (1 - decay) * v
        out.append(m / (1 - decay ** i))
    return out


def loss_curve_pil(losses, title: str = "Key-E loss") -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    values = [float(v) for v in losses if math.isfinite(float(v))]
    if len(values) < 2:
        draw.text((MARGIN, HEIGHT // 2), f"{title}: not enough steps to plot", fill="black")
        return img
    ema = smoothed(values)
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    x0, x1, y0, y1 = MARGIN, WIDTH - 8, 8, HEIGHT - MARGIN

    def point(i, v):
        return (x0 + (x1 - x0) * i / (len(values) - 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))

    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    draw.line([point(i, v) for i, v in enumerate(values)], fill=(170, 190, 235), width=1)
    draw.line([point(i, v) for i, v in enumerate(ema)], fill=(20, 50, 160), width=2)
    draw.text((x0 + 4, y0), f"{title}  (last avg {ema[-1]:.4f})", fill="black")
    draw.text((x0, y1 + 6), f"step 1 .. {len(values)}   loss {lo:.3f} .. {hi:.3f}", fill="black")
    return img


def loss_curve_image(losses, title: str = "Key-E loss") -> torch.Tensor:
    """As a ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    arr = np.asarray(loss_curve_pil(losses, title), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
