"""FSAP (thesis ch. 5, Alg. 7): user-tunable feature-space adversarial de-identification, on an SD 1.5 host.

The thesis encodes a face into StyleGAN2's W+ (pSp), moves W with sign-gradient steps and decodes it. Here the
feature W is the face's identity embedding that drives IP-Adapter-FaceID's identity stream
(:mod:`.identity_streams`): a unit vector of 512 components (each about 1/sqrt(512) = 0.0442), initialised to
the original's own embedding, rendered by the user's SD 1.5 model. Optionally the DDIM-inverted latent at the
chosen timestep is moved with sign steps too.

Alg. 7, as run here. With x the original (working image), f the recognizer (a differentiable FACE_MODEL),
L_I(W) = 1 - cos(f(x), f(x_hat(W))) and L_P = [L_mse, L_lpips, L_ssim] on the face region (the original's face
box, grown), for n = 1..N:

1. render x_hat_n = R(W_n) and evaluate L_I; if L_I > tau on this stand-in, render the image that would be
   delivered (the full DDIM render of W_n, full VAE, 8-bit) and evaluate L_I there: only if it also exceeds tau,
   stop with W_n; otherwise go on (the stand-in's pass is recorded, not counted as success);
2. identity step:   W += lambda_I * sign(dL_I/dW), renormalise;
3. k perceptual steps: W -= lambda_P * [sign dL_mse/dW + sign dL_lpips/dW + sign dL_ssim/dW], renormalise
   (each on a fresh render; L_lpips only when LPIPS weights are present, the report says when absent).

If tau is not reached within N iterations, W_{N+1} is rendered once more and the W with the highest L_I is the
result (said in the report). Success is never judged on the stand-in alone: the reported L_I and "reached" are
measured on the delivered image (the final render, 8-bit rounded). Cancel stops the search early and keeps the
best W so far: a W that reached tau (on the delivered render where that was checked) beats one that did not; among
those that did the lowest L_P wins, among the others the highest L_I.
``renormalise``: W <- W * |W_0| / |W| after every step (the embedding lives on the unit sphere).

Two renders (both documented in the node):

* the cheap differentiable render R(W), used for every loss: x_hat = Dec(x0_hat(z_t, sigma_t; W)), the denoised
  estimate of ONE UNet call on the fixed DDIM-inverted latent z_t at the chosen timestep (strength * T, inverted
  under the original's W_0 and the text conditioning, cfg 1), decoded without clamping by the gradient decoder
  (``gradient``: the full VAE by default, or ComfyUI's tiny preview decoder, :mod:`.gradient_path`). Gradients flow
  W -> FaceID tokens -> UNet (one call) -> decoder -> losses; an outer iteration costs (1 + k) such
  forward/backward passes (the perceptual step's three gradients come from one batched pass of three rows, or
  three backward passes of one forward with ``perceptual_mode="sequential"`` when memory is short);
* the final image: a full deterministic DDIM render from z_t (the optimised one when the latent is optimised)
  down to t = 0 over the same DDIM grid with the found W, the same grid the inversion went up: with W = W_0 it
  reconstructs the original up to inversion error, decoded by the full VAE whatever the gradient decoder.

Defaults rescaled from the thesis (N 100, k 6, tau 0.8, lambda_I 0.02, lambda_P 0.008): N, k, tau are kept
(tau is a cosine distance, as in the thesis); the steps are multiplied by 1/sqrt(512) = 0.0442, the ratio of a
unit-sphere embedding's component (0.0442) to W+ components taken to be of order 1 (pSp codes around
StyleGAN2's w_avg): lambda_I = 8.8e-4, lambda_P = 3.5e-4. One identity step then moves W by 0.02 in L2 norm.
The latent steps, when on, are ``latent_step`` times the same steps measured relative to the latent's own
component size (std(z_t) / 0.0442).

:data:`METHOD` is FSAP behind the pack's one method contract (:mod:`.contract`): :class:`FSAPSettings` (validated
when built), :func:`run` on the face crops (one face per photo, each from its own W_0), progress as one
:class:`~..guidance.progress.Step` per iteration with ``detail["history"]`` (the records so far: the live curve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..guidance.autograd import gradients_enabled, thaw, thaw_diffusion_model, thaw_inference_tensors
from ..guidance.ddim import check_finite, ddim_sigmas
from ..guidance.face.base import NoFaceError, crop_faces
from ..guidance.gradient_path import GradientOptions, whole_frame_gradient_decoder
from ..guidance.host import check_interrupt, interrupt_exceptions
from ..guidance.progress import Progress, report, within
from .contract import FaceResult, Method, MethodResult, Models

EMBEDDING_DIM = 512
UNIT_COMPONENT = 1.0 / math.sqrt(EMBEDDING_DIM)   # 0.0442: a unit 512-d vector's typical component
W_PLUS_COMPONENT = 1.0                             # assumed order of a pSp / StyleGAN2 W+ component
RESCALE = UNIT_COMPONENT / W_PLUS_COMPONENT
THESIS_DEFAULTS = {"n": 100, "k": 6, "tau": 0.8, "lambda_i": 0.02, "lambda_p": 0.008}
LAMBDA_I = THESIS_DEFAULTS["lambda_i"] * RESCALE   # 8.84e-4
LAMBDA_P = THESIS_DEFAULTS["lambda_p"] * RESCALE   # 3.54e-4
PERCEPTUAL_MODES = ("batched", "sequential")
FACE_GROW = 0.25  # the face region: the detected box grown by this share of its size on every side


@dataclass(frozen=True)
class FSAPSettings:
    """FSAP's settings, validated once when built. ``gradient``: the decoder of the differentiable render (None:
    the full VAE; FSAP has no face window, the whole crop is decoded)."""
    tau: float = THESIS_DEFAULTS["tau"]
    lambda_i: float = LAMBDA_I
    lambda_p: float = LAMBDA_P
    k: int = THESIS_DEFAULTS["k"]
    n: int = THESIS_DEFAULTS["n"]
    steps: int = 50              # DDIM grid of the inversion and the final render
    strength: float = 0.5        # the chosen timestep: strength * T (the inverted latent's level)
    latent_step: float = 0.0     # 0: W only; > 0: also sign steps on z_t (relative size, see module doc)
    renormalise: bool = True
    perceptual_mode: str = "batched"
    identity_weight: float = 1.0  # the identity stream's weight w
    gradient: GradientOptions | None = field(default=None, compare=False)

    def __post_init__(self):
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and 0.0 < self.tau <= 2.0):
            raise ValueError(f"tau must lie in (0, 2]: it is a cosine distance 1 - cos (0 = same identity, 2 = "
                             f"opposite); the thesis uses 0.8. Got {self.tau}")
        for name in ("k", "n"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"{name} must be a whole number >= 0 (thesis: N = 100 iterations, k = 6 perceptual "
                                 f"steps per iteration), got {v}")
        for name in ("lambda_i", "lambda_p", "latent_step", "identity_weight"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.perceptual_mode not in PERCEPTUAL_MODES:
            raise ValueError(f"perceptual_mode must be one of {PERCEPTUAL_MODES}, got {self.perceptual_mode!r}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength (the timestep as a fraction of T) must lie in (0, 1], got {self.strength}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps}")


# -- the steps ------------------------------------------------------------------------------------------------------
def sign_step(w: torch.Tensor, grads: list[torch.Tensor], step: float, direction: float) -> torch.Tensor:
    """w + direction * step * sum_i sign(g_i): Eq. 5.6 (one gradient, direction +1) and Eq. 5.8 (three, -1)."""
    total = torch.zeros_like(w)
    for g in grads:
        total = total + torch.sign(g.to(w))
    return w + direction * step * total


def renormalised(w: torch.Tensor, norm: torch.Tensor | float) -> torch.Tensor:
    """W scaled back to the norm of W_0 (per row)."""
    return w * (torch.as_tensor(norm, dtype=w.dtype, device=w.device) / w.norm(dim=-1, keepdim=True).clamp_min(1e-12))


# -- perceptual losses (differentiable) --------------------------------------------------------------------------------
def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of (B, C, H, W) images in [0, 1] (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), per row."""
    c = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    size -= (size + 1) % 2
    g = _gaussian(size).to(a)
    k = torch.outer(g, g).view(1, 1, size, size).repeat(c, 1, 1, 1)

    def filt(t):
        return F.conv2d(t, k, groups=c)
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a ** 2
    s_bb = filt(b * b) - mu_b ** 2
    s_ab = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.flatten(1).mean(1)


def lpips_distance(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable AlexNet-LPIPS of (B, 3, H, W) [0, 1] images, per row, with an LPIPS model that has
    ``features(x)`` and ``heads`` (``evaluation.lpips.LPIPS``); the same sum as its ``distance``."""
    if min(a.shape[-2:]) < 64:  # AlexNet's strides need room
        a = F.interpolate(a, size=(64, 64), mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=(64, 64), mode="bilinear", align_corners=False)
    fa, fb = model.features(a.float()), model.features(b.float())
    total = 0.0
    for x, y, lin in zip(fa, fb, model.heads):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((x - y) ** 2, lin.to(x)).flatten(1).mean(1)
    return total


PERCEPTUAL = ("mse", "lpips", "ssim")


def perceptual_losses(x_hat: torch.Tensor, x: torch.Tensor, lpips=None) -> dict[str, torch.Tensor]:
    """{"mse", "ssim" (1 - SSIM), "lpips" (with an LPIPS model)}: per row of (B, 3, h, w) face crops."""
    ref = x.expand_as(x_hat)
    out = {"mse": ((x_hat - ref) ** 2).flatten(1).mean(1)}
    if lpips is not None:
        out["lpips"] = lpips_distance(lpips, x_hat, ref)
    out["ssim"] = 1.0 - ssim(x_hat, ref)
    return out


def face_region(box, height: int, width: int, grow: float = FACE_GROW) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the face box grown by ``grow`` of its size on every side, inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    size = max(x1 - x0, y1 - y0, 1.0)
    x0, y0, x1, y1 = x0 - grow * size, y0 - grow * size, x1 + grow * size, y1 + grow * size
    ys = max(0, int(math.floor(y0))), min(height, int(math.ceil(y1)))
    xs = max(0, int(math.floor(x0))), min(width, int(math.ceil(x1)))
    if ys[1] - ys[0] < 8 or xs[1] - xs[0] < 8:
        raise ValueError(f"the face region {xs[0]}..{xs[1]} x {ys[0]}..{ys[1]} is too small to compare")
    return ys[0], ys[1], xs[0], xs[1]


# -- the search -------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    iteration: int
    l_i: float
    l_p: float
    parts: dict
    w: torch.Tensor | None = None  # (1, D) the W this record was rendered from
    l_i_delivered: float | None = None  # L_I on the delivered render of this W (measured when the stand-in passed)

    def passed(self, tau: float) -> bool:
        """L_I > tau on the stand-in, and on the delivered render where that was measured."""
        return self.l_i > tau and (self.l_i_delivered is None or self.l_i_delivered > tau)


@dataclass
class FSAPResult:
    w: torch.Tensor                       # (1, D) the found embedding
    w0: torch.Tensor                      # (1, D) the original's
    latent: torch.Tensor                  # z_t (VAE latent space) the final render starts from
    l_i: float                            # L_I of the found W on the delivered image (``l_i_on`` says where)
    l_p: float
    iterations: int                       # outer iterations run
    reached: bool                         # L_I > tau on the delivered image
    interrupted: bool = False
    history: list[Record] = field(default_factory=list)
    trace: list | None = None             # per step: (kind, pre-normalisation delta), when asked for
    lpips: bool = False
    image: torch.Tensor | None = None     # IMAGE (1, H, W, 3): the final DDIM render
    cheap: torch.Tensor | None = None     # IMAGE of the cheap render at the found W
    notes: list[str] = field(default_factory=list)
    l_i_standin: float | None = None      # L_I of the found W on the one-UNet-call stand-in x_hat0
    l_i_on: str = "delivered image"       # where ``l_i`` was measured ("stand-in x_hat0" only without a render)
    standin_only: list = field(default_factory=list)  # (iteration, stand-in L_I, delivered L_I): passes not kept


def better(a: Record, b: Record | None, tau: float) -> bool:
    """Is ``a`` a better result than ``b``: reached tau beats not; then lower L_P, or higher L_I."""
    if b is None:
        return True
    ra, rb = a.passed(tau), b.passed(tau)
    if ra != rb:
        return ra
    return a.l_p < b.l_p if ra else a.l_i > b.l_i


class Renderer:
    """R(W, z) -> decoded x0_hat of one UNet call, inside the sampler (``model`` is the k-diffusion model)."""

    def __init__(self, model, extra_args, sigma, stream_set, tokens: Callable, decode: Callable):
        self.model, self.extra_args, self.sigma = model, extra_args, sigma
        self.ss, self.tokens, self.decode = stream_set, tokens, decode

    def __call__(self, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b = max(w.shape[0], z.shape[0])
        self.ss.set_tokens("identity", on=self.tokens(w))
        z = z.expand(b, *z.shape[1:]) if z.shape[0] != b else z
        den = self.model(z, thaw(self.sigma * z.new_ones([b])), **self.extra_args)
        return self.decode(den)


class Search:
    """The losses on a render, and Alg. 7's loop (see module doc)."""

    def __init__(self, settings: FSAPSettings, face_model, original: torch.Tensor, landmarks: torch.Tensor,
                 box, lpips=None, progress: Progress | None = None, trace: bool = False,
                 deliver: Callable | None = None):
        self.s = settings
        self.deliver = deliver   # deliver(w, z) -> IMAGE (1, H, W, 3) as delivered; None: stand-in only
        self.face_model = face_model
        self.x = original        # (1, 3, H, W)
        self.landmarks = landmarks.float().reshape(1, 5, 2)
        self.box = box
        self.lpips = lpips
        self.progress = progress
        self.trace = [] if trace else None
        self.ref = None

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = face_region(self.box, self.x.shape[-2], self.x.shape[-1])
        if img.shape[-2:] != self.x.shape[-2:]:
            img = F.interpolate(img, size=self.x.shape[-2:], mode="bilinear", align_corners=False)
        return img[..., y0:y1, x0:x1]

    def identity_loss(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-2:] != self.x.shape[-2:]:
            img = F.interpolate(img, size=self.x.shape[-2:], mode="bilinear", align_corners=False)
        lms = thaw(self.landmarks).to(img.device).expand(img.shape[0], 5, 2).contiguous()
        emb = self.face_model.embed(img, lms)
        return 1.0 - F.cosine_similarity(emb, self.ref.to(emb).expand_as(emb), dim=1)

    def delivered_loss(self, image: torch.Tensor) -> float:
        """L_I of a delivered IMAGE (1, H, W, 3): rounded to 8 bits as saved, no gradient."""
        with torch.no_grad():
            img = ((image.float().clamp(0, 1) * 255).round() / 255).movedim(-1, 1).to(self.x.device)
            if img.shape[-2:] != self.x.shape[-2:]:
                img = F.interpolate(img, size=self.x.shape[-2:], mode="bilinear", align_corners=False)
            emb = self.face_model.embed(img, self.landmarks.to(img.device))
            return float(1.0 - F.cosine_similarity(emb, self.ref.to(emb), dim=1)[0])

    def perceptual(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        return perceptual_losses(self._crop(img), self._crop(self.x.to(img)), self.lpips)

    def run(self, render: Renderer, w0: torch.Tensor, z0: torch.Tensor) -> tuple:
        """(W, z_t, history, best record, reached, iterations done, interrupted); inside gradients_enabled()."""
        s = self.s
        recognizer = getattr(self.face_model, "recognizer", None)
        if isinstance(recognizer, torch.nn.Module):
            thaw_inference_tensors(recognizer)
        self.x = thaw(self.x).float()
        with torch.no_grad():
            self.ref = self.face_model.embed(self.x, self.landmarks.to(self.x.device)).detach()
        norm = w0.norm(dim=-1, keepdim=True).double()
        w = thaw(w0).detach().double()
        z = thaw(z0).detach()
        z_unit = float(z.std()) / UNIT_COMPONENT
        names = [n for n in PERCEPTUAL if n != "lpips" or self.lpips is not None]
        history, best, best_wz = [], None, (w.clone(), z.clone())
        self.history = history
        reached, interrupted, done = False, False, 0
        try:
            for it in range(1, s.n + 2):
                # 1. render W_n and evaluate; the identity step reuses this forward pass
                wl, zl = self._leaves(w, z, 1)
                img = render(wl, zl)
                l_i = self.identity_loss(img)[0]
                check_finite(l_i.detach(), f"L_I at iteration {it}")
                with torch.no_grad():
                    parts = {k: float(v[0]) for k, v in self.perceptual(img.detach()).items()}
                rec = Record(it, float(l_i.detach()), sum(parts.values()), parts, w.detach().float().cpu().clone())
                history.append(rec)
                if rec.l_i > s.tau and self.deliver is not None:  # the stand-in passed: check what is delivered
                    rec.l_i_delivered = self.delivered_loss(self.deliver(w.detach(), z.detach()))
                if better(rec, best, s.tau):
                    best, best_wz = rec, (w.clone(), z.clone())
                if rec.passed(s.tau):
                    reached = True
                    break
                if it > s.n:
                    break  # W_{N+1} is only evaluated
                # 2. identity step: ascend L_I
                w, z = self._apply(w, z, [self._grads(l_i, wl, zl)], s.lambda_i, +1.0, norm, z_unit, "identity")
                # 3. k perceptual steps: descend L_mse, L_lpips, L_ssim (nothing moves when lambda_P = 0)
                for _ in range(s.k if s.lambda_p > 0 else 0):
                    check_interrupt()
                    w, z = self._perceptual_step(render, w, z, names, norm, z_unit)
                done = it
                self._tick(it)
        except interrupt_exceptions():
            interrupted = True
        w_best, z_best = best_wz
        return w_best.to(w0.dtype), z_best.to(z0.dtype), history, best, reached, done, interrupted

    def _leaves(self, w, z, rows: int):
        wl = w.expand(rows, -1).clone().requires_grad_(True)
        zl = z.expand(rows, *z.shape[1:]).clone().requires_grad_(self.s.latent_step > 0)
        return wl, zl

    def _grads(self, loss, wl, zl, retain: bool = False):
        if self.s.latent_step > 0:
            gw, gz = torch.autograd.grad(loss, [wl, zl], retain_graph=retain)
            return gw, gz
        (gw,) = torch.autograd.grad(loss, [wl], retain_graph=retain)
        return gw, None

    def _tick(self, it: int) -> None:
        """The end of iteration ``it``: one Step (its history for the live curve), then Cancel is checked."""
        report(self.progress, min(it, self.s.n), max(self.s.n, 1),
               f"FSAP iteration {it}: L_I {self.history[-1].l_i:.4f} on the stand-in (tau {self.s.tau:g})",
               history=list(self.history), iteration=it)
        check_interrupt()

    def _apply(self, w, z, grads, lam, direction, norm, z_unit, kind):
        """One sign step on W (and z) from ``grads``: a list of (dL/dW, dL/dz or None), one pair per loss."""
        with torch.no_grad():
            new = sign_step(w, [g for g, _ in grads], lam, direction)
            if self.trace is not None:
                self.trace.append((kind, (new - w).detach().clone()))
            w = renormalised(new, norm) if self.s.renormalise else new
            check_finite(w, f"W after the {kind} step")
            if self.s.latent_step > 0:
                z = sign_step(z, [g for _, g in grads], lam * self.s.latent_step * z_unit, direction)
        return w, z

    def _perceptual_step(self, render, w, z, names, norm, z_unit):
        m = len(names)
        if self.s.perceptual_mode == "batched":  # row i carries loss i: one forward/backward for all three signs
            wl, zl = self._leaves(w, z, m)
            losses = self.perceptual(render(wl, zl))
            gw, gz = self._grads(sum(losses[n][i] for i, n in enumerate(names)), wl, zl)
            per = [(gw[i:i + 1], None if gz is None else gz[i:i + 1]) for i in range(m)]
        else:  # one forward, one backward per loss
            wl, zl = self._leaves(w, z, 1)
            losses = self.perceptual(render(wl, zl))
            per = [self._grads(losses[n][0], wl, zl, retain=i < m - 1) for i, n in enumerate(names)]
        return self._apply(w, z, per, self.s.lambda_p, -1.0, norm, z_unit, "perceptual")


# -- running it in ComfyUI's sampling ---------------------------------------------------------------------------------
def _search_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, job=None):
    """k-diffusion signature: runs the search at sigmas[0] on the inverted latent x (sampling space)."""
    extra_args = {} if extra_args is None else extra_args
    with gradients_enabled():
        thaw_diffusion_model(model)
        job["stream_set"].thaw()
        render = Renderer(model, extra_args, sigmas[0], job["stream_set"], job["tokens"], job["decode"])

        def deliver(w, z):
            """The image the user would get for (W, z_t): the full DDIM render down the grid, full VAE."""
            from ..guidance.guided_ddim import sample_guided_ddim
            with torch.no_grad():
                job["stream_set"].set_tokens("identity", on=job["tokens"](w.float()))
                x0 = sample_guided_ddim(model, z.to(x), job["sigmas"], extra_args, guidance=None)
                return job["decode_full"](x0)
        job["search"].deliver = deliver if job.get("decode_full") is not None else None
        job["out"] = job["search"].run(render, job["w0"], x)
        z = job["out"][1]
    return z.detach().to(x)


def embedding_tokens(adapter, clip_states=None, shortcut_scale: float = 1.0) -> Callable:
    """W (B, D) -> the identity stream's tokens (differentiable in W); FaceID Plus reuses fixed CLIP states."""
    kind = adapter.spec.kind
    if kind not in ("faceid", "faceid-plus"):
        raise ValueError(f"{adapter.name} is a {kind} adapter; FSAP moves the identity embedding of a FaceID adapter "
                         "(ip-adapter-faceid_sd15.bin or ip-adapter-faceid-plusv2_sd15.bin)")

    def tokens(w):
        p = next(adapter.image_proj.parameters())
        w = w.to(device=p.device, dtype=p.dtype)
        if kind == "faceid":
            return adapter.tokens(w)
        return adapter.tokens(w, clip_states.to(p).expand(w.shape[0], -1, -1), shortcut_scale)
    return tokens


def check_face_model(face_model) -> None:
    if not getattr(face_model, "differentiable", False) or getattr(face_model, "recognizer", None) is None:
        name = getattr(face_model, "name", face_model)
        raise ValueError(f"FSAP takes the gradient of L_I through the recognizer, and {name} is not differentiable "
                         "(dlib is for evaluation only): use a FaceNet / ArcFace FACE_MODEL from the face model loader "
                         "(FaceNet-CASIA converts itself from a PyPI wheel)")


def original_face(face_model, image: torch.Tensor, face_mask: torch.Tensor | None = None):
    """The face of a (1, H, W, 3) crop (the one under ``face_mask``, the face the crop was cut around; the largest
    without one): (landmarks (5, 2), box (4,)); NoFaceError when none."""
    faces = crop_faces(face_model.detect(image[0]), face_mask)
    if not faces:
        raise NoFaceError(0, f"{image.shape[2]}x{image.shape[1]} pixels; FSAP moves the identity of a detected face")
    face = faces[0]
    return face.landmarks.float(), face.box.float()


def run_fsap(model, vae, conditioning, adapter, w0: torch.Tensor, image: torch.Tensor, face_model,
             settings: FSAPSettings, *, invert: Callable | None = None, lpips=None, clip_states=None,
             shortcut_scale: float = 1.0, progress: Progress | None = None, trace: bool = False,
             render_final: bool = True, face_mask: torch.Tensor | None = None) -> FSAPResult:
    """FSAP on one working image (1, H, W, 3): the search of one crop, what :func:`run` does per crop.

    ``model``: the user's SD 1.5 MODEL (the identity stream is added here); ``adapter``: a FaceID adapter;
    ``w0``: the original's identity embedding (1, 512) in the adapter's space (:func:`start_embedding`);
    ``face_model``: the differentiable recognizer of L_I (:func:`check_face_model`; its detector finds the face
    region); ``invert``: the DDIM-inversion sampler (default ``inversion.ddim.ddim_invert``); ``lpips``: an LPIPS
    model or None (then L_P has two terms); ``progress`` gets one Step per iteration (``detail["history"]``: the
    records so far) and may raise ComfyUI's interrupt (the best W so far is kept).
    """
    import comfy.samplers

    from ..guidance import identity_streams as ids
    from ..guidance.guided_ddim import guided_ddim_sampler
    from ..guidance.sampling import sample_with_comfy
    from ..inversion.ddim import ddim_invert

    invert = invert or ddim_invert
    tokens = embedding_tokens(adapter, clip_states, shortcut_scale)
    image = image[..., :3].float()
    landmarks, box = original_face(face_model, image, face_mask)
    w0 = w0.detach().float().cpu()
    with torch.no_grad():
        on = tokens(w0)
    off = adapter.off_tokens() if adapter.spec.kind == "faceid" else adapter.tokens(
        torch.zeros_like(w0), clip_states, shortcut_scale)
    patched, ss = ids.apply_identity_streams(model, [ids.Stream("identity", adapter, on, off,
                                                                settings.identity_weight)])
    # before the inversion: a missing tiny-decoder file fails fast
    decode = whole_frame_gradient_decoder(vae, patched, settings.gradient, "FSAP")
    sigmas = ddim_sigmas(patched.get_model_object("model_sampling"), settings.steps, settings.strength)
    z0 = vae.encode(image)
    z_t = sample_with_comfy(patched, invert, sigmas, conditioning, z0)
    x = image.permute(0, 3, 1, 2)
    search = Search(settings, face_model, x, landmarks, box, lpips, progress, trace)
    job = {"stream_set": ss, "tokens": tokens, "decode": decode, "search": search, "w0": w0, "sigmas": sigmas,
           "decode_full": lambda x0: vae.decode(patched.model.process_latent_out(x0))[..., :3].float().clamp(0, 1)}
    sampler = comfy.samplers.KSAMPLER(_search_sampler, extra_options={"job": job})
    z_found = sample_with_comfy(patched, sampler, torch.stack([sigmas[0], sigmas[0].new_zeros(())]),
                                conditioning, z_t)
    w, _, history, best, reached, done, interrupted = job["out"]
    delivered_known = best.l_i_delivered is not None
    result = FSAPResult(w=w.float(), w0=w0, latent=z_found if settings.latent_step > 0 else z_t,
                        l_i=best.l_i_delivered if delivered_known else best.l_i, l_p=best.l_p, iterations=done,
                        reached=reached, interrupted=interrupted, history=history, trace=search.trace,
                        lpips=lpips is not None, l_i_standin=best.l_i,
                        l_i_on="delivered image" if delivered_known else "stand-in x_hat0",
                        standin_only=[(h.iteration, h.l_i, h.l_i_delivered) for h in history
                                      if h.l_i > settings.tau and not h.passed(settings.tau)])
    for it, standin, delivered in result.standin_only:
        result.notes.append(f"iteration {it}: the one-UNet-call stand-in passed tau (L_I {standin:.4f}) but the "
                            f"delivered render did not (L_I {delivered:.4f}): not counted, the search went on")
    if lpips is None:
        result.notes.append("LPIPS weights absent: L_P = MSE + SSIM only")
    if render_final:
        with torch.no_grad():
            ss.set_tokens("identity", on=tokens(result.w))
        final = sample_with_comfy(patched, guided_ddim_sampler(None), sigmas, conditioning, result.latent)
        result.image = vae.decode(final)[..., :3].float().clamp(0, 1)
        result.l_i, result.l_i_on = search.delivered_loss(result.image), "delivered image"
        result.reached = result.l_i > settings.tau
    if not result.reached:
        result.notes.insert(0, f"NOT reached: L_I on the {result.l_i_on} is {result.l_i:.4f} <= tau = "
                               f"{settings.tau} after {done} of N = {settings.n} iterations"
                               f"{' (stopped by Cancel)' if interrupted else ''}; the W with the best L_I is used "
                               f"and no de-identification is claimed")
    return result


# -- the loss curve ----------------------------------------------------------------------------------------------------
def curve_image(history: list[Record], tau: float) -> torch.Tensor:
    """IMAGE (1, H, W, 3) of :func:`curve_pil`."""
    import numpy as np
    return torch.from_numpy(np.asarray(curve_pil(history, tau), dtype=np.float32) / 255.0)[None]


def curve_pil(history: list[Record], tau: float, width: int = 512, height: int = 256):
    """L_I (red) and L_P (blue, its own scale) per iteration, tau dashed (a PIL image; the node's live preview)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = 36, width - 10, 20, height - 28
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    n = len(history)
    if n == 0:
        d.text((x0 + 4, height // 2), "FSAP: no iteration yet", fill="black")
    else:
        li = [r.l_i for r in history]
        lp = [r.l_p for r in history]
        lo, hi = min(min(li), tau), max(max(li), tau)
        hi = hi if hi > lo else lo + 1e-6
        plo, phi = min(lp), max(lp)
        phi = phi if phi > plo else plo + 1e-6

        def px(i):
            return x0 + (x1 - x0) * (i / max(n - 1, 1))
        ty = y1 - (y1 - y0) * (tau - lo) / (hi - lo)
        for xs in range(x0, x1, 8):
            d.line([(xs, ty), (min(xs + 4, x1), ty)], fill=(120, 120, 120))
        pts_i = [(px(i), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for i, v in enumerate(li)]
        pts_p = [(px(i), y1 - (y1 - y0) * (v - plo) / (phi - plo)) for i, v in enumerate(lp)]
        for pts, col in ((pts_p, (30, 60, 200)), (pts_i, (200, 30, 30))):
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            else:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=col)
        d.text((x0 + 4, 4), f"L_I {li[-1]:.3f} (red, {lo:.2f}..{hi:.2f}; tau {tau:g} dashed)   "
                            f"L_P {lp[-1]:.3f} (blue, {plo:.3f}..{phi:.3f})", fill="black")
        d.text((x0, y1 + 8), f"iteration 1 .. {n}", fill="black")
    return img


def report_text(result: FSAPResult, settings: FSAPSettings) -> str:
    standin = "" if result.l_i_standin is None else f"; stand-in x_hat0 L_I {result.l_i_standin:.4f}"
    lines = [f"FSAP: L_I = {result.l_i:.4f} on the {result.l_i_on} ({'>' if result.reached else '<='} tau "
             f"{settings.tau:g}: {'reached' if result.reached else 'NOT reached'}) after {result.iterations} of N = "
             f"{settings.n} iterations (k = {settings.k}){standin}; L_P = {result.l_p:.4f}",
             f"lambda_I = {settings.lambda_i:.3g}, lambda_P = {settings.lambda_p:.3g} per embedding component "
             f"(thesis 0.02 / 0.008 x {RESCALE:.4f}); cos(W, W0) = "
             f"{float(F.cosine_similarity(result.w, result.w0)):.4f}",
             f"LPIPS: {'used' if result.lpips else 'absent (L_P = MSE + SSIM)'}"]
    if result.interrupted:
        lines.append("stopped by Cancel: the best W so far was rendered")
    lines += [n for n in result.notes if not n.startswith("LPIPS")]
    return "\n".join(lines)


# -- the method behind the contract --------------------------------------------------------------------------------
def start_embedding(face_embedding, photo: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_0 (1, D), its aligned 224 crop (1, 224, 224, 3) or None) of photo ``photo`` of the batch, from a
    FACE_EMBEDDING of the original(s): the one row whose ``batch_index`` is ``photo`` (without batch_index, row
    ``photo``)."""
    emb = face_embedding.get("embedding") if isinstance(face_embedding, dict) else None
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] < 1:
        raise ValueError("face_embedding must hold the original face's embedding (Face Embedding on the original "
                         "photo)")
    index = face_embedding.get("batch_index")
    index = list(range(emb.shape[0])) if index is None else [int(b) for b in index]
    rows = [r for r, b in enumerate(index) if b == photo]
    if len(rows) != 1:
        raise ValueError(f"face_embedding holds {len(rows)} embedding(s) of photo {photo} of the batch; FSAP starts "
                         "from one face's embedding per photo: run Face Embedding on the same photo(s) with the "
                         "largest face")
    w0 = emb[rows[0]:rows[0] + 1].detach().float().cpu()
    if not bool(torch.isfinite(w0).all()) or float(w0.norm()) == 0.0:
        raise ValueError("the face embedding is zero or not finite: embed the original's face with Face Embedding")
    crops = face_embedding.get("crops_224")
    return w0, (None if crops is None else crops[rows[0]:rows[0] + 1])


def _clip_states(adapter, clip_vision, crops_224):
    """FaceID Plus reads the aligned face through CLIP-ViT-H; plain FaceID needs nothing."""
    if adapter.spec.kind != "faceid-plus":
        return None
    if clip_vision is None or crops_224 is None:
        raise ValueError("FaceID Plus reads the aligned face through CLIP-ViT-H: connect clip_vision (and embed the "
                         "face with Face Embedding, which keeps its aligned crop)")
    return clip_vision.encode_image(crops_224, crop=False)[adapter.spec.clip_input]


def check_models(models: Models, settings: FSAPSettings) -> None:
    """(The contract calls it before any photo is planned.) A differentiable recognizer and a FaceID adapter."""
    check_face_model(models.face_model)
    if models.adapter is None:
        raise ValueError("FSAP moves the identity embedding of a FaceID adapter: connect one "
                         "(ip-adapter-faceid_sd15.bin or ip-adapter-faceid-plusv2_sd15.bin)")


def run(crops: list, models: Models, settings: FSAPSettings, progress: Progress | None = None) -> MethodResult:
    """The contract's run: the search on each crop, rendered in full.

    ``models``: ``model``, ``vae``, ``face_model`` (the differentiable recognizer of L_I), ``adapter`` (FaceID),
    ``clip_vision`` (FaceID Plus only); ``extra["conditioning"]`` the text CONDITIONING, ``extra["face_embedding"]``
    the originals' FACE_EMBEDDING (:func:`start_embedding`), ``extra["lpips"]`` an LPIPS model or None. Each face's
    report is measured on its delivered render; ``parts["result"]`` holds the :class:`FSAPResult` (the found W, the
    history)."""
    lpips, faces = models.extra.get("lpips"), []
    for n, job in enumerate(crops):
        w0, crops_224 = start_embedding(models.extra.get("face_embedding"), job.photo)
        result = run_fsap(models.model, models.vae, models.extra["conditioning"], models.adapter, w0, job.image,
                          models.face_model, settings, lpips=lpips,
                          clip_states=_clip_states(models.adapter, models.clip_vision, crops_224),
                          progress=within(progress, n, len(crops), f"face {n + 1}/{len(crops)}" if len(crops) > 1
                                          else ""),
                          face_mask=job.face_mask() if job.crop.face_index >= 0 else None)
        faces.append(FaceResult(result.image, {
            "face": job.crop.face_index, "l_i": result.l_i, "l_i_on": result.l_i_on,
            "l_i_standin": result.l_i_standin, "tau": settings.tau, "reached": result.reached,
            "iterations": result.iterations, "l_p": result.l_p, "interrupted": result.interrupted,
            "lpips": result.lpips, "notes": list(result.notes), "text": report_text(result, settings)},
            parts={"result": result}))
    return MethodResult(faces)


METHOD = Method("FSAP", run, FSAPSettings, max_faces=1, check_models=check_models)
