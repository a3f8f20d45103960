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



def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x``, or a ValueError naming ``what`` when it holds NaN or infinity (a run must never end in a black
    image that looks like success)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} became non-finite (NaN or infinity): a setting is out of range or the model "
                         "produced NaNs (in fp16, try fp32); nothing was saved")
    return x


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
