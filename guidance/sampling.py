"""Running a k-diffusion sampler through ComfyUI's own sampling, as the stock SamplerCustom does.

ComfyUI's path (``comfy.sample.sample_custom``) loads the model, applies the conditioning's timestep
ranges, area and control, wraps the sampler for inpainting masks and shows the live latent preview;
the pack's samplers (guided DDIM, inversion, recovery) run inside it so they behave like any other.
"""
from __future__ import annotations

import torch


def sample_with_comfy(model, sampler, sigmas: torch.Tensor, conditioning, latent: torch.Tensor,
                      noise: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Run ``sampler`` (a SAMPLER, or a k-diffusion function) over ``sigmas`` from ``latent`` + ``noise``.

    cfg is 1.0 with ``conditioning`` as both positive and negative, so the model sees the conditioning
    alone (the Diff-Privacy schedule carries UC itself). ``noise`` None: none is added (inversion and
    recovery start from the latent itself).
    """
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        sampler = comfy.samplers.KSAMPLER(sampler)
    noise = torch.zeros_like(latent) if noise is None else noise
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, conditioning, conditioning, latent,
                                      callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
