"""Deterministic DDIM (eta = 0), DDIM inversion and the timestep grid of Diff-Privacy.

Parameterisation. ComfyUI samples in k-diffusion's variance-exploding form: for an eps (or v)
model with DDPM schedule alpha_bar_t, the sampling variable is

    x = z_t * sqrt(1 + sigma_t^2) = z_0 + sigma_t * eps,   sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)

where z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps is the paper's latent (Eq. 1), and
``model(x, sigma)`` returns the denoised estimate x0_hat (= the paper's z0_hat, Eq. 10).
In this form DDIM with eta = 0 (paper Eq. 13) is exactly an Euler step in sigma,

    x_next = x + (sigma_next - sigma) * eps_hat,     eps_hat = (x - x0_hat) / sigma,

and DDIM inversion (Eq. 4) is the same step taken upwards. ``vp_scale(sigma)`` = sqrt(1 + sigma^2)
converts between x and z_t.

Timestep grid. The reference uses CompVis' "uniform" DDIM timesteps {1, 1+k, ..., 1+k(S-1)},
k = T // S. ComfyUI's ``ddim_uniform`` scheduler yields the same grid for S dividing T, but more
than S steps otherwise; :func:`ddim_timesteps` always yields exactly S. Noising for strength
S_ns keeps the lowest t_enc = int(S_ns * S) grid points and noises straight to the first of them:
the reference noised one grid point higher (CompVis img2img off-by-one) and then denoised from
the next lower one; here the noise level and the first denoising step agree. The last step goes
to sigma = 0 (ComfyUI's convention) rather than to alpha_bar_0, a difference of sigma ~ 0.03.
"""
from __future__ import annotations

import math

import torch


def check_interrupt():
    """Raise ComfyUI's interrupt exception if the user pressed Cancel; no-op outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def vp_scale(sigma) -> torch.Tensor | float:
    """sqrt(1 + sigma^2): x = z_t * vp_scale(sigma) for variance-preserving (DDPM) models."""
    if isinstance(sigma, torch.Tensor):
        return torch.sqrt(1.0 + sigma * sigma)
    return math.sqrt(1.0 + float(sigma) ** 2)


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The reference's uniform DDIM grid, ascending: 1 + k*i for i < steps, k = T // steps.

    With k = 1 (steps = T) the +1 offset is dropped so every timestep stays below T.
    """
    steps = int(steps)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must lie in 1..{num_timesteps}, got {steps}")
    k = num_timesteps // steps
    offset = 1 if k > 1 else 0
    return [offset + k * i for i in range(steps)]


def denoising_step_count(steps: int, strength: float) -> int:
    """t_enc = int(S_ns * S): how many of the S grid steps an img2img run of strength S_ns takes."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength (S_ns) must lie in (0, 1], got {strength}")
    t_enc = int(strength * steps + 1e-9)  # guard against 0.29 * 100 = 28.999...
    if t_enc < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step "
                         f"(int(strength * steps) = 0): raise the strength or the step count")
    return t_enc


def discrete_sigmas(model_sampling) -> torch.Tensor:
    """The model's own noise levels sigma_t for t = 0..T-1; rejects non-DDPM models clearly."""
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is None or sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError("Diff-Privacy's DDIM needs a discrete-time diffusion model (e.g. SD 1.x) whose "
                         "model_sampling has a table of sigmas")
    try:
        import comfy.model_sampling as cms
        if isinstance(model_sampling, cms.CONST):
            raise ValueError("Diff-Privacy's DDIM is defined for DDPM (eps or v prediction) models such as "
                             "SD 1.x/2.x, not for flow-matching models")
    except ImportError:
        pass
    return sigmas.detach().float().cpu()


def ddim_sigmas(model_sampling, steps: int, strength: float = 1.0) -> torch.Tensor:
    """Descending sigmas of an S-step DDIM run of strength S_ns, ending at 0 (a native SIGMAS).

    ``sigmas[0]`` is the noise level the original latent is noised to (timestep 1 + k(t_enc - 1)).
    """
    table = discrete_sigmas(model_sampling)
    grid = ddim_timesteps(steps, len(table))[:denoising_step_count(steps, strength)]
    picked = table[torch.tensor(grid[::-1])]
    return torch.cat([picked, picked.new_zeros(1)])


def ddim_step(x, denoised, sigma, sigma_next):
    """One DDIM (eta = 0) step from sigma to sigma_next: Euler in sigma on eps_hat."""
    if float(sigma) == 0.0:
        return denoised
    return x + (sigma_next - sigma) * (x - denoised) / sigma


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
    return x


ddim_recover = sample_ddim


@torch.no_grad()
def ddim_invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM inversion (paper Eq. 4) of a clean latent ``x`` up the descending ``sigmas``.

    Walks the grid of :func:`sample_ddim` backwards, from ``sigmas[-1]`` (0) to ``sigmas[0]``, so
    that recovery over the same ``sigmas`` undoes it up to discretisation error. As in the
    reference, the step from level a to the next level b evaluates the noise predictor at b's
    timestep (and conditioning) on the current latent z_a: the model gets x * vp(b) / vp(a), which
    it reads as z_a at noise level b. Same k-diffusion signature, so it runs as a KSAMPLER
    (with zero noise the sampler's start is the latent itself).
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
    return x


def key_i_to_vp(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Key-I as the reference stores it (z_T = x_T / sqrt(1 + sigma^2), scaled latent space)."""
    return x_t / vp_scale(float(sigma))


def key_i_from_vp(z_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Inverse of :func:`key_i_to_vp`: the reference's z_T as this pack's sampling-space x_T."""
    return z_t * vp_scale(float(sigma))
