"""ComfyUI IMAGE batches as the pack's nodes take them (not a node module)."""
from __future__ import annotations

import torch


def rgb_batch(image, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE as (B, H, W, 3) float: grayscale repeated, alpha dropped, other layouts refused."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise ValueError(f"{name} must be an IMAGE batch (B, H, W, C), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise ValueError(f"{name} has {c} channels; expected RGB (3), RGBA (4) or grayscale (1)")
    return image.float()
