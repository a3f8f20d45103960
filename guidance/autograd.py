"""Gradients inside ComfyUI.

ComfyUI executes every node under ``torch.inference_mode()``. Tensors created there
(including the weights a loader node reads) are *inference tensors*: autograd refuses to
save them for backward, so a loss that flows through a frozen model whose weights are
inference tensors fails with "Inference tensors cannot be saved for backward".

Guidance (gradient of a face loss w.r.t. a latent) and Key-E training (gradient w.r.t. the
MSI's parameters through a frozen UNet) both need autograd through such models. The recipe,
as ComfyUI's own training node does it, is:

    with gradients_enabled():                # inference_mode(False) + enable_grad()
        thaw_inference_tensors(unet)         # normal clones of the weights, once
        x = thaw(x)                          # normal clone of an input tensor
        loss(f(x)).backward()
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def gradients_enabled():
    """Leave ComfyUI's inference mode and switch autograd on for the block."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def thaw(t: torch.Tensor) -> torch.Tensor:
    """A tensor autograd may use: ``t`` itself, or a normal clone if it is an inference tensor.

    Must be called inside :func:`gradients_enabled` (a clone made under inference mode
    would be an inference tensor again).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("thaw() must run inside gradients_enabled(), not under inference mode")
    return t.clone() if t.is_inference() else t


def thaw_inference_tensors(module: torch.nn.Module) -> int:
    """Replace, in place, every inference-tensor parameter or buffer of ``module`` by a normal clone.

    Values, dtypes, devices and ``requires_grad`` are kept, so the model computes exactly
    what it did; it only becomes usable by autograd. Returns how many tensors were cloned,
    so a second call on the same module is free (returns 0).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("thaw_inference_tensors() must run inside gradients_enabled()")
    cloned = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                cloned += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()
                cloned += 1
    return cloned


def thaw_diffusion_model(model) -> None:
    """Make the UNet behind a k-diffusion model wrapper autograd-usable (ComfyUI loads inference tensors): the one
    way every sampler and method that backpropagates through the UNet prepares it (KSamplerX0Inpaint -> guider ->
    BaseModel, or a plain module)."""
    inner = getattr(getattr(model, "inner_model", None), "inner_model", None)
    target = inner if isinstance(inner, torch.nn.Module) else (model if isinstance(model, torch.nn.Module) else None)
    if target is not None:
        thaw_inference_tensors(target)
