"""DDIM inversion (Key-I) and recovery of Diff-Privacy, on the DDIM maths of ``guidance/ddim.py``
(parameterisation, timestep grid and the step itself are derived there).
"""
from __future__ import annotations

import torch

from ..guidance.ddim import check_finite, ddim_sigmas, ddim_step, vp_scale
from ..guidance.host import check_interrupt
from ..guidance.sampling import sample_with_comfy
from .fingerprint import model_fingerprint
from .key_check import check_key_e, check_keys, key_i_latent
from .key_e import KeyE
from .keyfile import META_CLIP_FINGERPRINT


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Plain deterministic DDIM over ``sigmas`` (k-diffusion convention): Diff-Privacy's recovery.

    With Key-I as ``x`` at ``sigmas[0]`` and the Key-E schedule as conditioning this is the
    paper's identity recovery (Sec. 2.4).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        check_interrupt()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = ddim_step(x, denoised, sigmas[i], sigmas[i + 1])
    return check_finite(x, "the DDIM result")


ddim_recover = sample_ddim


@torch.no_grad()
def ddim_invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM inversion (paper Eq. 4) of a clean latent ``x`` up the descending ``sigmas``.

    Walks the grid of :func:`sample_ddim` backwards, from ``sigmas[-1]`` (0) to ``sigmas[0]``, so
    that recovery over the same ``sigmas`` undoes it up to discretisation error. The step from
    level a to the next level b evaluates the noise predictor at b's timestep (and conditioning)
    on the current latent z_a: the model gets x * vp(b) / vp(a), which it reads as z_a at noise
    level b (the usual DDIM-inversion approximation eps(z_{t_(i-1)}, t_i)).

    The reference evaluates the same timesteps t_1 = 1, 1+k, ..., t_S with the same C^{t//100},
    but not this way: it takes the clean z_0 as the latent at t_1 and evaluates every step at
    the level its latent is at, eps(z_{t_i}, t_i), stepping to alpha-bar of t_(i+1); its last step
    goes to alpha-bar of t_S + 1, one level past t_S, where its recovery starts (spec section 4,
    util.py:69). This code keeps the latent on the recovery grid (0, t_1, ..., t_S, ending where
    recovery starts), so each evaluation is at the destination level. Same k-diffusion
    signature, so it runs as a KSAMPLER (with zero noise the sampler's start is the latent itself).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    ascending = sigmas.flip(0)
    n = len(ascending) - 1
    for i in range(n):
        check_interrupt()
        sigma, sigma_next = ascending[i], ascending[i + 1]
        x_in = x * (vp_scale(sigma_next) / vp_scale(sigma))
        denoised = model(x_in, sigma_next * s_in, **extra_args)
        eps = (x_in - denoised) / sigma_next
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_next, "sigma_hat": sigma_next, "denoised": denoised})
        x = x + (sigma_next - sigma) * eps
    return check_finite(x, "the DDIM-inverted latent (Key-I)")


def key_i_to_vp(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Key-I as the reference stores it (z_T = x_T / sqrt(1 + sigma^2), scaled latent space)."""
    return x_t / vp_scale(float(sigma))


def key_i_from_vp(z_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Inverse of :func:`key_i_to_vp`: the reference's z_T as this pack's sampling-space x_T."""
    return z_t * vp_scale(float(sigma))


def make_key_i(model, key_e: KeyE, latent: torch.Tensor, steps: int) -> dict:
    """Key-I: DDIM inversion of the original's latent over the full S-step grid under Key-E. A LATENT that records
    its step count, noise level, image size and the fingerprints of the model and of Key-E's text encoder, so that
    recovery with anything else is refused (:mod:`.key_check`)."""
    check_key_e(key_e.provenance, model=model)
    sigmas = ddim_sigmas(model.get_model_object("model_sampling"), steps, 1.0)
    key_i = sample_with_comfy(model, ddim_invert, sigmas, key_e.schedule_every_step(), latent)
    return key_i_latent(key_i, steps=steps, sigma=float(sigmas[0]), model_fingerprint=model_fingerprint(model),
                        clip_fingerprint=(key_e.provenance or {}).get(META_CLIP_FINGERPRINT))


def recover(model, key_e: KeyE, key_i: dict, steps: int) -> dict:
    """Identity recovery (Sec. 2.4): deterministic DDIM from Key-I under Key-E over the same S-step grid, after
    checking both keys' step count, model, text encoder and image size (whatever node they came from)."""
    check_keys(key_i, key_e.provenance, model=model, steps=steps)
    sigmas = ddim_sigmas(model.get_model_object("model_sampling"), steps, 1.0)
    return {"samples": sample_with_comfy(model, sample_ddim, sigmas, key_e.schedule_every_step(), key_i["samples"])}
