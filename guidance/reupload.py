"""What a site does to an uploaded photo: rescale it and re-encode it as JPEG.

:func:`transform` is differentiable in the rescale and passes the JPEG round trip straight through, so an attack can
average over re-uploads (hiding from detectors' ``robust`` option) and the evaluation can measure whether a protection
survives one (:mod:`..evaluation.detection`)."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F


def _jpeg(x255: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of (1, 3, H, W) [0, 255] (Pillow, 4:2:0 as most sites re-encode)."""
    from PIL import Image
    import numpy as np
    arr = x255[0].detach().permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(back).permute(2, 0, 1).unsqueeze(0).to(x255.device)


def _rescale(x255: torch.Tensor, s: float) -> torch.Tensor:
    h, w = x255.shape[2:]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(x255, size=size, mode="bilinear", align_corners=False, antialias=s < 1)


def transform(x255: torch.Tensor, scale: float = 1.0, quality: int | None = None) -> torch.Tensor:
    """Rescale (differentiable), then JPEG (straight-through gradient): a re-upload as a site would do it."""
    if scale != 1.0:
        x255 = _rescale(x255, scale)
    if quality is not None:
        x255 = x255 + (_jpeg(x255, quality) - x255).detach()
    return x255
