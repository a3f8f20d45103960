"""The one way the pack samples: through ComfyUI's guider, as the stock SamplerCustomAdvanced does.

Every method samples with :func:`sample` (a GUIDER, a SAMPLER, SIGMAS, a latent and its noise). It goes through
``guider.sample`` exactly as core ``SamplerCustomAdvanced`` does, so the conditioning's timestep ranges, areas,
control, inpainting masks and model patches apply, the live latent preview is shown and Cancel stops it. The other
entries are ways of building its inputs:

- :func:`sample_with_comfy`: a k-diffusion sampler over ``sigmas`` with one CONDITIONING seen alone (cfg 1: the
  Diff-Privacy schedule carries UC itself) — guided DDIM, Key-I inversion, recovery;
- :func:`sample_text_guided`: positive / negative / cfg with a named sampler and scheduler, as stock ``KSampler``
  does (``denoise`` < 1 starts part-way; a ``noise_mask`` keeps the unmasked latent) — DP renders, De-ID's fakes;
- a method's own GUIDER (DIFP's dual guidance) goes to :func:`sample` directly.
"""
from __future__ import annotations

import torch


def sample(guider, sampler, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor | None = None,
           seed: int = 0, noise_mask: torch.Tensor | None = None, preview: bool = True) -> torch.Tensor:
    """Run ``sampler`` (a SAMPLER, or a k-diffusion function) under ``guider`` over ``sigmas`` from ``latent`` +
    ``noise`` (None: none is added, as inversion and recovery start from the latent itself).

    ``preview`` False: no latent preview and no progress bar (inner renders of an optimisation, whose steps the
    method reports itself); Cancel still stops it (ComfyUI's sampling checks the interrupt at every model call)."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        sampler = comfy.samplers.KSAMPLER(sampler)
    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
    noise = torch.zeros_like(latent) if noise is None else noise
    callback = latent_preview.prepare_callback(guider.model_patcher, len(sigmas) - 1) if preview else None
    out = guider.sample(noise, latent, sampler, sigmas, denoise_mask=noise_mask, callback=callback,
                        disable_pbar=not (preview and comfy.utils.PROGRESS_BAR_ENABLED), seed=int(seed))
    return out.to(comfy.model_management.intermediate_device())


def cfg_guider(model, positive, negative=None, cfg: float = 1.0):
    """Core CFGGuider: ``positive`` against ``negative`` (None: the positive itself) at ``cfg``."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive if negative is None else negative)
    guider.set_cfg(cfg)
    return guider


def scheduled_sigmas(model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The SIGMAS stock KSampler uses for ``scheduler`` and ``steps``; ``denoise`` < 1 keeps the last steps of a
    longer schedule (as core BasicScheduler does)."""
    import comfy.samplers
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def sample_with_comfy(model, sampler, sigmas: torch.Tensor, conditioning, latent: torch.Tensor,
                      noise: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Run ``sampler`` over ``sigmas`` from ``latent`` + ``noise`` with ``conditioning`` alone (cfg 1.0, the same
    conditioning as positive and negative: the model sees it alone; the Diff-Privacy schedule carries UC itself)."""
    return sample(cfg_guider(model, conditioning), sampler, sigmas, latent, noise, seed)


def sample_text_guided(model, positive, negative, cfg: float, sampler_name: str, scheduler: str, steps: int,
                       latent: torch.Tensor, seed: int, denoise: float = 1.0, noise_mask: torch.Tensor | None = None,
                       preview: bool = True) -> torch.Tensor:
    """What stock ``KSampler`` does, through :func:`sample`: noise from ``seed``, ``sampler_name`` over
    ``scheduler``'s sigmas, ``positive`` against ``negative`` at ``cfg``."""
    import comfy.sample
    import comfy.samplers
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, int(seed))
    return sample(cfg_guider(model, positive, negative, cfg), comfy.samplers.sampler_object(sampler_name),
                  scheduled_sigmas(model, scheduler, steps, denoise), latent, noise, seed, noise_mask, preview)
