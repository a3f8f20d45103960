"""Multi-scale image features from the user's CLIP-vision model (the MSI's input, paper Eq. 6).

The reference reads HF ``hidden_states[3, 7, 11, 15, -1]`` of CLIP ViT-L/14: the outputs of
encoder layers 3, 7, 11, 15 and 24, before the post-layernorm. ComfyUI's CLIP-vision model
returns the same tensors with ``intermediate_output="all"`` (entry k-1 is the output of layer k).

Unlike the reference, which casts a [-1, 1] tensor to uint8 and so shows CLIP an almost black
image, the image goes through ComfyUI's own ``clip_preprocess`` (resize the short side, centre
crop, the model's mean/std) from the IMAGE's [0, 1] range.

Features are computed once per image (and once more for its mirror image when training uses
random flips) and mean-pooled over the 257 tokens, as the reference's per-layer AdaptiveAvgPool.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..guidance.host import clip_preprocess, resident_clone

DEFAULT_LAYERS = (3, 7, 11, 15, 24)


def parse_layers(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"3, 7, 11, 15, 24"`` -> (3, 7, 11, 15, 24); 1-based encoder layer numbers, ascending."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
        try:
            layers = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"layers must be comma-separated integers such as '3, 7, 11, 15, 24', got "
                             f"{text!r}") from None
    else:
        layers = tuple(int(x) for x in text)
    if not layers:
        raise ValueError("at least one CLIP-vision layer is needed")
    if any(x < 1 for x in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be distinct 1-based layer numbers in ascending order, got {layers}")
    return layers


def vision_layer_count(clip_vision) -> int:
    """Number of transformer layers in a ComfyUI CLIP_VISION's image tower."""
    try:
        return len(clip_vision.model.vision_model.encoder.layers)
    except AttributeError:
        raise ValueError("the CLIP_VISION input is not a CLIP/SigLIP ViT (no vision_model.encoder.layers); "
                         "load a CLIP ViT-L/14 vision model with CLIPVisionLoader") from None


def vision_width(clip_vision) -> int:
    return int(clip_vision.model.vision_model.embeddings.position_embedding.weight.shape[1])


@torch.no_grad()
def clip_layer_features(clip_vision, images: torch.Tensor, layers: Sequence[int] = DEFAULT_LAYERS) -> torch.Tensor:
    """Token-averaged hidden states of the given layers: [B, len(layers), width], float32.

    ``images``: ComfyUI IMAGE [B, H, W, C] in [0, 1].
    """
    import comfy.model_management

    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE of shape [B, H, W, 3], got {tuple(images.shape)}")
    layers = parse_layers(layers)
    n = vision_layer_count(clip_vision)
    if layers[-1] > n:
        raise ValueError(f"CLIP-vision layer {layers[-1]} requested but the model has only {n} layers")

    clip_vision = resident_clone(clip_vision, "the CLIP-vision model")  # the copy the pack's other paths use too
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    device = clip_vision.load_device
    pixels = clip_preprocess(images.to(device=device, dtype=torch.float32),
                             size=clip_vision.image_size, mean=clip_vision.image_mean, std=clip_vision.image_std,
                             crop=True)
    _, all_hidden, _, _ = clip_vision.model(pixel_values=pixels, intermediate_output="all")
    # all_hidden: [B, n_layers, tokens, width]; index k-1 is the output of layer k (pre post-layernorm)
    picked = all_hidden[:, [k - 1 for k in layers]]
    return picked.float().mean(dim=2)
