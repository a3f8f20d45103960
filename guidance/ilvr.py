"""Realism control of DIFP (You et al. 2024, Eqs. 12-14): iterative latent variable refinement (ILVR).

After every DDIM step z'_{t-1} the low frequencies of the sample are replaced by those of the reference X_com
noised to the same level with fresh noise (Eq. 12):

    z_{t-1} = z'_{t-1} - LP_H(z'_{t-1}) + LP_H(X_com,t-1),     X_com,t-1 = X_com + sigma_{t-1} * eps

(ComfyUI's sampling space: x = z_0 + sigma * eps, so the noised reference is X_com + sigma * eps; LP is linear
and the VP scale sqrt(1 + sigma^2) is common to both terms, so the step is the paper's Eq. 12 exactly).
LP_H is an antialiased resize to H x H and back (plain bilinear without antialiasing damages the result, see
jychoi118/ilvr_adm). H follows Eq. 13 per side of size M (the latent's side, 64 for SD 1.5 at 512^2):

    H = -g_rea (M - 1) + (M + k)

g_rea -> 0 gives H >= M (an all-pass filter: the sample becomes the noised reference), g_rea -> 1 gives
H = 1 + k (only the mean, or the k+1 lowest frequencies, are constrained). ⚠ The paper does not report k;
default 0. Eq. 14 (adaptive): g_rea = SSIM(z'_{t-1}, X_com,t-1) / SSIM(z'_{t-1}, z'_{t-1}) (the denominator
is 1). ⚠ The paper's text says a higher similarity drives g_rea towards 0, which contradicts the formula:
here g_rea follows the formula as printed (similar -> g_rea near 1 -> weaker constraint).

``space="pixel"``: LP_H is applied to decoded images and encoded back (x - E(LP(D(x))) + E(LP(D(ref_t)))):
slower, approximate (the VAE is not linear), offered because the paper filters images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

MODES = ("fixed", "adaptive")
SPACES = ("latent", "pixel")


def filter_size(g_rea: float, m: int, k: float = 0.0) -> int:
    """H of Eq. 13 for a side of ``m``, rounded and clamped to [1, m] (H >= m is the all-pass filter)."""
    if not math.isfinite(g_rea) or not 0.0 <= g_rea <= 1.0:
        raise ValueError(f"g_rea (realism scale) must lie in [0, 1], got {g_rea}")
    h = -g_rea * (m - 1) + (m + k)
    return int(min(max(round(h), 1), m))


def lowpass(z: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """LP_H: antialiased bicubic resize of (B, C, H0, W0) to (h, w) and bicubic back; identity when (h, w) is
    the size itself."""
    size = tuple(z.shape[-2:])
    if (h, w) == size:
        return z
    down = F.interpolate(z.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(down, size=size, mode="bicubic", align_corners=False).to(z.dtype)


def lowpass_g(z: torch.Tensor, g_rea: float, k: float = 0.0) -> torch.Tensor:
    """LP_H with H from g_rea (Eq. 13) for each side of ``z``."""
    return lowpass(z, filter_size(g_rea, z.shape[-2], k), filter_size(g_rea, z.shape[-1], k))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-sample SSIM of (B, C, H, W) tensors (uniform window, data range of ``b``), for Eq. 14."""
    a, b = a.float(), b.float()
    rng = (b.flatten(1).amax(1) - b.flatten(1).amin(1)).clamp(min=1e-6).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    win = min(window, a.shape[-1], a.shape[-2])
    pool = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a ** 2
    var_b = pool(b * b) - mu_b ** 2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@dataclass
class RealismControl:
    """ILVR after each DDIM step (call it with the stepped latent, the level it is at and the step index).

    ``reference``: X_com as a clean latent in the sampler's space (1 or B, C, h, w). ``stop_at``: the fraction of
    the steps that are controlled (steps i < ceil(stop_at * n)); later steps run free. ``seed``: the fresh noise
    that noises the reference each step. ``decode`` / ``encode`` (pixel space only): latent <-> image.
    """
    reference: torch.Tensor
    g_rea: float = 0.6
    k: float = 0.0
    mode: str = "fixed"
    stop_at: float = 1.0
    seed: int = 0
    space: str = "latent"
    decode: Callable | None = None
    encode: Callable | None = None
    g_history: list = field(default_factory=list)  # g_rea used per step (adaptive mode: per sample)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"realism mode must be one of {MODES}, got {self.mode!r}")
        if self.space not in SPACES:
            raise ValueError(f"realism space must be one of {SPACES}, got {self.space!r}")
        if self.space == "pixel" and (self.decode is None or self.encode is None):
            raise ValueError("realism control in pixel space needs a VAE (decode and encode)")
        if not 0.0 <= float(self.stop_at) <= 1.0:
            raise ValueError(f"realism stop_at must lie in [0, 1], got {self.stop_at}")
        filter_size(float(self.g_rea), 64, self.k)  # validates g_rea
        self.reset()

    def reset(self) -> None:
        self._generator = torch.Generator().manual_seed(int(self.seed))
        self.g_history = []

    def check_fits(self, x: torch.Tensor) -> None:
        """Refuse, in image terms, a reference of another size (or channel count, or batch) than the sampled latent."""
        ref = self.reference
        if ref.dim() == x.dim() and ref.shape[1:] == x.shape[1:] and ref.shape[0] in (1, x.shape[0]):
            return
        scale = 8  # pixels per latent cell (SD-family VAEs)
        if ref.dim() == x.dim() == 4 and ref.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"realism control: the reference image is {ref.shape[-1] * scale}x{ref.shape[-2] * scale} "
                             f"pixels but the image being sampled is {x.shape[-1] * scale}x{x.shape[-2] * scale}: give "
                             "the Realism DDIM Sampler a reference of the sampled size (scale it with Upscale Image, "
                             "or encode the same image the latent came from)")
        raise ValueError(f"realism control: the reference holds {ref.shape[0]} image(s) of {tuple(ref.shape[1:])} "
                         f"latent values but the sampler runs a batch of {x.shape[0]} of {tuple(x.shape[1:])}: give "
                         "one reference image (or one per latent) made with the same VAE, at the sampled size")

    def active(self, step: int, total: int) -> bool:
        return step < math.ceil(float(self.stop_at) * total - 1e-9)

    def _lp(self, z: torch.Tensor, g: float, sigma: float) -> torch.Tensor:
        if self.space == "latent":
            return lowpass_g(z, g, self.k)
        scale = math.sqrt(1.0 + sigma * sigma)
        image = self.decode(z / scale)
        return self.encode(lowpass_g(image.movedim(-1, 1), g, self.k).movedim(1, -1)).to(z) * scale

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma_next, step: int, total: int) -> torch.Tensor:
        if not self.active(step, total):
            return x
        sigma = float(sigma_next)
        self.check_fits(x)
        ref = self.reference.to(x).expand_as(x)
        noise = torch.randn(x.shape, generator=self._generator).to(x)
        ref_t = ref + sigma * noise
        if self.mode == "fixed":
            self.g_history.append([float(self.g_rea)] * x.shape[0])
            return x - self._lp(x, float(self.g_rea), sigma) + self._lp(ref_t, float(self.g_rea), sigma)
        gs = [float(v) for v in ssim(x, ref_t).clamp(0.0, 1.0)]
        self.g_history.append(gs)
        out = []
        for b, g in enumerate(gs):
            xb, rb = x[b:b + 1], ref_t[b:b + 1]
            out.append(xb - self._lp(xb, g, sigma) + self._lp(rb, g, sigma))
        return torch.cat(out)
