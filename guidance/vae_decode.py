"""Differentiable decoding of a sampling-space latent with a ComfyUI VAE.

``VAE.decode`` runs without gradients and moves results to the intermediate device, so guidance
calls the VAE's ``first_stage_model`` directly. The sampler's latent (x0_hat) is in the model's
sampling space (for SD 1.x: the VAE latent times 0.18215); ``latent_format.process_out`` turns it
into the VAE's own latent first, which is what ``VAE.decode`` expects of a LATENT.
"""
from __future__ import annotations

from typing import Callable

import torch

from .autograd import thaw_inference_tensors


class VaeDecoder:
    """Callable: sampling-space latent (B, C, h, w) -> image (B, 3, H, W) in [0, 1], differentiable.

    Must be called inside ``gradients_enabled()`` when gradients are wanted; the VAE's weights are
    thawed (made autograd-usable, values unchanged) on first use.
    """

    def __init__(self, vae, process_out: Callable[[torch.Tensor], torch.Tensor]):
        for attr in ("first_stage_model", "process_output", "vae_dtype", "device"):
            if not hasattr(vae, attr):
                raise ValueError(f"expected a ComfyUI VAE (missing {attr!r}), got {type(vae).__name__}")
        self.vae = vae
        self.process_out = process_out
        self._thawed = False

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        try:
            import comfy.model_management as mm
            mm.load_models_gpu([vae.patcher])  # what VAE.decode does first
        except (ImportError, AttributeError):
            pass
        if not self._thawed and not torch.is_inference_mode_enabled():
            thaw_inference_tensors(vae.first_stage_model)
            self._thawed = True
        raw = self.process_out(latent)
        out = vae.first_stage_model.decode(raw.to(device=vae.device, dtype=vae.vae_dtype))
        image = vae.process_output(out.float())
        return image[:, :3].to(latent.device)


def make_vae_decoder(vae, model_or_latent_format) -> VaeDecoder:
    """A :class:`VaeDecoder` for ``vae`` and the latent format of a MODEL (ModelPatcher) or a latent_format."""
    fmt = model_or_latent_format
    if hasattr(fmt, "get_model_object"):
        fmt = fmt.get_model_object("latent_format")
    if not hasattr(fmt, "process_out"):
        raise ValueError("need a MODEL or a latent format with process_out to decode sampling latents")
    return VaeDecoder(vae, fmt.process_out)
