"""Differentiable decoding of a sampling-space latent with a ComfyUI VAE.

``VAE.decode`` runs without gradients and moves results to the intermediate device, so guidance
calls the VAE's ``first_stage_model`` directly. The sampler's latent (x0_hat) is in the model's
sampling space (for SD 1.x: the VAE latent times 0.18215); ``latent_format.process_out`` turns it
into the VAE's own latent first, which is what ``VAE.decode`` expects of a LATENT.

No clamp: ComfyUI's SD VAEs (and TAESD, whose ``decode`` also returns [-1, 1]) map the decoder's
output with ``clamp((x + 1) / 2, 0, 1)``, which zeroes the gradient of every saturated pixel. The
reference feeds the unclamped decode to the recognizer, so guidance uses ``(x + 1) / 2`` for such
VAEs and keeps any other ``process_output`` as it is.
"""
from __future__ import annotations

from typing import Callable

import torch

from .autograd import thaw_inference_tensors
from .host import resident_clone


def unclamped_output(process_output: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``process_output`` without its clamp when it is ComfyUI's ``clamp((x + 1) / 2, 0, 1)``; else itself.

    Recognised by probing: it must give (x + 1) / 2 inside [-1, 1] and clip to [0, 1] outside.
    """
    probe = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    try:
        out = process_output(probe)
    except (TypeError, ValueError, RuntimeError):  # a mapping that cannot take a 1-D tensor: keep it
        return process_output
    if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(
            out.float(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])):
        return lambda x: (x + 1.0) / 2.0
    return process_output


class VaeDecoder:
    """Callable: sampling-space latent (B, C, h, w) -> image (B, 3, H, W), [0, 1] up to the VAE's
    overshoot (unclamped, see the module doc), differentiable.

    Must be called inside ``gradients_enabled()`` when gradients are wanted; the VAE's weights are
    thawed (made autograd-usable, values unchanged) on first use.
    """

    def __init__(self, vae, process_out: Callable[[torch.Tensor], torch.Tensor]):
        for attr in ("first_stage_model", "process_output", "vae_dtype", "device"):
            if not hasattr(vae, attr):
                raise ValueError(f"expected a ComfyUI VAE (missing {attr!r}), got {type(vae).__name__}")
        self.vae = vae
        self.process_out = process_out
        self.process_output = unclamped_output(vae.process_output)
        # Our own resident copy of the VAE's patcher (host.resident_clone: newer ComfyUI streams weights, "dynamic
        # VRAM"; the copy is made once per loaded VAE). On 0.3.75 the clone shares the module.
        patcher = getattr(vae, "patcher", None)
        self.patcher = resident_clone(patcher, "the VAE") if patcher is not None else None
        self.decoder = self.patcher.model if self.patcher is not None else vae.first_stage_model
        self.core = self.decoder.decode  # what torch.compile may replace (gradient_path.apply_flags)
        ratio = getattr(vae, "downscale_ratio", 8)  # a function for some video VAEs
        self.downscale = ratio if isinstance(ratio, int) else 8
        self.description = "full VAE"
        self._thawed = False

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if self.patcher is not None:
            import comfy.model_management as mm
            mm.load_models_gpu([self.patcher], force_full_load=True)  # what VAE.decode does first, kept resident
        if not self._thawed and not torch.is_inference_mode_enabled():
            thaw_inference_tensors(self.decoder)
            self._thawed = True
        raw = self.process_out(latent)
        out = self.core(raw.to(device=vae.device, dtype=vae.vae_dtype))
        image = self.process_output(out.float())
        return image[:, :3].to(latent.device)


def make_vae_decoder(vae, model_or_latent_format) -> VaeDecoder:
    """A :class:`VaeDecoder` for ``vae`` and the latent format of a MODEL (ModelPatcher) or a latent_format."""
    fmt = model_or_latent_format
    if hasattr(fmt, "get_model_object"):
        fmt = fmt.get_model_object("latent_format")
    if not hasattr(fmt, "process_out"):
        raise ValueError("need a MODEL or a latent format with process_out to decode sampling latents")
    return VaeDecoder(vae, fmt.process_out)
