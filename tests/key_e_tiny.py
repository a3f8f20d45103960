"""Fresh copies of the tiny models for the Key-E tests.

Loaded from the shared fixture files (tests/tiny_models.py) with ComfyUI's own loaders under
``torch.inference_mode()``, exactly as the server's CheckpointLoaderSimple / CLIPVisionLoader do,
so every weight is an inference tensor. Fresh copies rather than the session fixtures, because
training thaws the weights and some tests strengthen the UNet's cross-attention.
"""
from __future__ import annotations

import torch


def load_tiny_models(checkpoint_path, clip_vision_path):
    """(model_patcher, clip, vae, clip_vision) of the tiny SD 1.x checkpoint and CLIP-vision model."""
    import comfy.clip_vision
    import comfy.sd
    import comfy_test_pack  # noqa: F401  (registers the tiny model types)

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint_path), output_vae=True,
                                                                 output_clip=True)[:3]
        clip_vision = comfy.clip_vision.load(str(clip_vision_path))
    return model, clip, vae, clip_vision


def strengthen_cross_attention(model_patcher, factor: float):
    """Scale the UNet's cross-attention values so the text conditioning matters more (random
    weights make the tiny UNet almost ignore it; a trained SD UNet does not)."""
    with torch.inference_mode():
        for name, module in model_patcher.model.diffusion_model.named_modules():
            if name.endswith("attn2.to_v"):
                module.weight.mul_(factor)
