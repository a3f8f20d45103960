"""Identity-guided deterministic DDIM (paper Eq. 12, Alg. 1 lines 4-8) as a k-diffusion sampler.

Each step predicts x0_hat, decodes it, embeds the face, evaluates an identity energy and
corrects the DDIM update against the energy's gradient.

The correction in ComfyUI's parameterisation. The paper corrects the VP latent,
z'_{t-1} = z_{t-1} - lambda_t * grad, where x = z * sqrt(1 + sigma^2) (see ``guidance/ddim.py``).
Multiplying by sqrt(1 + sigma_next^2):

    x'_next = DDIM(x, x0_hat) - lambda_t * sqrt(1 + sigma_next^2) * grad

* ``through_unet=False`` (the reference's cheap path): grad = d E(Dec(x0_hat)) / d x0_hat with
  x0_hat detached, so no backward pass through the UNet. x0_hat is in the same scaled latent
  space as the reference's z0_hat, so lambda means the same as in the reference.
* ``through_unet=True`` (Eq. 9 literally): grad = d E / d z_t through the UNet's prediction.
  Since x = z_t sqrt(1 + sigma^2), d E / d z_t = sqrt(1 + sigma^2) * d E / d x.

Gradients are taken inside ``gradients_enabled()``: ComfyUI runs nodes under inference mode and
its loaders produce inference tensors, which are thawed once (values unchanged).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .ddim import check_finite, ddim_step, vp_scale
from .host import check_interrupt
from .schedule import last_uncond_timestep
from .autograd import gradients_enabled, thaw, thaw_diffusion_model, thaw_inference_tensors
from .energy import Energy
from .face.base import NoFaceError, select_faces
from .gradient_path import auto_chunk, checkpointed_blocks, decode_window, decoder_module, face_windows, \
    precision_context

log = logging.getLogger("diffprivacy")


@dataclass
class GuidanceScale:
    """lambda_t: ``above`` where sigma > ``sigma_switch`` (the Key-E stages), ``below`` elsewhere (UC)."""

    above: float = 1.0
    below: float | None = None  # None: the same as above (a constant lambda)
    sigma_switch: float = 0.0

    def __call__(self, sigma) -> float:
        below = self.above if self.below is None else self.below
        return float(self.above) if float(sigma) > self.sigma_switch else float(below)


def stage_guidance_scale(model_sampling, tau: float, above: float, below: float | None = None) -> GuidanceScale:
    """lambda per schedule stage: ``above`` on DDPM timesteps t > tau*T, ``below`` on t <= tau*T.

    The switch sits half-way (in log sigma) between the last UC timestep and the next one, so it
    splits the integer timesteps exactly as the embedding schedule does.
    """
    num = len(model_sampling.sigmas)
    t_half = last_uncond_timestep(tau, num) + 0.5
    switch = float(model_sampling.sigma(torch.tensor(float(t_half)))) if t_half < num - 1 else float("inf")
    return GuidanceScale(above=above, below=below, sigma_switch=switch)


class IdentityGuidance:
    """Energy of a batch of sampling-space latents: decode -> align each chosen face -> embed -> energy.

    ``decode``: latent (B, C, h, w) -> image (B, 3, H, W), differentiable (see ``vae_decode``).
    ``reference``: the chosen faces' embeddings, (F, D) (or (D,) for one face); ``landmarks``: their 5
    points, (F, 5, 2) (or (5, 2)), in pixels of an ``image_size`` (H, W) image (rescaled if the decoded
    size differs). Every face is steered at once: the energy is the sum over the faces of the energy of
    that face's embeddings across the batch, E = sum_f E(emb[:, f], ref_f), so a group photo is
    protected in one run and each face moves relative to its own original. ``chunk`` > 0
    back-propagates that many samples at a time (exact, since the energy sees a sample only through
    its embeddings): less memory for one extra forward pass; 0 chooses it so that the estimated peak
    fits the free memory ComfyUI reports (all at once when it fits; :func:`.gradient_path.auto_chunk`).

    Speed (issue 17, :mod:`.gradient_path`): ``window_margin`` (latent pixels; None: the whole frame)
    decodes only the latent window around the chosen faces' aligned crops; ``checkpointing`` recomputes
    the decoder's blocks in the backward pass instead of keeping their activations; ``precision`` (a
    dtype, e.g. bf16) runs decode and embedding under autocast, the energy in fp32.

    ``redetect_every``: 0 aligns every prediction with the original's landmarks (the predictions keep
    the original's layout). k > 0, for tasks that move faces: on sampler steps k, 2k, ... the face
    model detects faces on each decoded x0_hat (no gradient); each chosen face takes the landmarks of
    the detection nearest to where it was (within its own size), else keeps its previous ones. The
    step is the sampler's index passed to :meth:`value` / :meth:`energy_and_grad`; :meth:`reset`
    (called when a sampling run starts) goes back to the original's landmarks.
    """

    def __init__(self, face_model, decode: Callable, reference: torch.Tensor, landmarks: torch.Tensor,
                 energy: Energy, image_size: tuple[int, int] | None = None, chunk: int = 0,
                 redetect_every: int = 0, window_margin: int | None = None, checkpointing: bool = False,
                 precision: torch.dtype | None = None):
        if not getattr(face_model, "differentiable", False):
            raise ValueError(f"identity guidance needs a differentiable face model; {face_model!r} is not "
                             "(use a FaceNet/ArcFace FACE_MODEL for guidance, dlib only for evaluation)")
        landmarks = landmarks.detach().float()
        landmarks = landmarks[None] if landmarks.dim() == 2 else landmarks
        references = reference.detach().reshape(landmarks.shape[0] if landmarks.dim() == 3 else 1, -1)
        if landmarks.dim() != 3 or landmarks.shape[1:] != (5, 2) or landmarks.shape[0] != references.shape[0]:
            raise ValueError(f"landmarks must be (5, 2) or (faces, 5, 2), one set per reference embedding; got "
                             f"{tuple(landmarks.shape)} for {references.shape[0]} reference(s)")
        if int(redetect_every) < 0:
            raise ValueError(f"redetect_every must be 0 (never) or a number of steps, got {redetect_every}")
        self.face_model = face_model
        self.decode = decode
        self.references = references          # (F, D)
        self.face_landmarks = landmarks        # (F, 5, 2)
        self.energy = energy
        self.image_size = image_size
        self.chunk = int(chunk)
        self.redetect_every = int(redetect_every)
        self.window_margin = None if window_margin is None else int(window_margin)
        self.checkpointing = bool(checkpointing)
        self.precision = precision
        if self.window_margin is not None and self._crop_geometry() is None:
            log.warning("[Diff-Privacy] face window: %r has no recognizer crop template; decoding the whole frame",
                        face_model)
            self.window_margin = None
        self._tracked = None  # (B, F, 5, 2) landmarks last re-detected on x0_hat; None: the original's
        self._thawed = False

    @property
    def num_faces(self) -> int:
        return self.references.shape[0]

    @property
    def reference(self) -> torch.Tensor:
        """(D,) for one face, (F, D) for several."""
        return self.references[0] if self.num_faces == 1 else self.references

    @classmethod
    def from_image(cls, face_model, decode: Callable, image: torch.Tensor, energy: Energy,
                   face_index: int | None = None, chunk: int = 0, redetect_every: int = 0, *,
                   choice: str | None = None, indices=(), mask: torch.Tensor | None = None,
                   **speed) -> "IdentityGuidance":
        """Detect the faces in ``image`` ((H, W, 3) or (1, H, W, 3), [0, 1]) and embed the chosen ones.

        ``choice``: "all", "largest", "indices" (with ``indices``) or "mask" (with ``mask`` (H, W)); the
        default is the largest face, or the face at ``face_index`` when given. ``speed``: the keyword
        arguments ``window_margin``, ``checkpointing``, ``precision`` of the constructor.
        """
        if image.dim() == 4:
            if image.shape[0] != 1:
                raise ValueError(f"the reference must be one image, got a batch of {image.shape[0]}")
            image = image[0]
        image = image[..., :3].float()
        faces = face_model.detect(image)
        if not faces:
            raise NoFaceError(0, f"{image.shape[1]}x{image.shape[0]} pixels")
        if choice is None:
            choice, indices = ("largest", ()) if face_index is None else ("indices", (face_index,))
        chosen, _ = select_faces(faces, choice, indices, mask)
        if not chosen:
            raise ValueError(f"none of the {len(faces)} detected face(s) is chosen ({choice}): draw the mask over "
                             "the faces to protect, or choose all faces")
        lms = torch.stack([faces[i].landmarks.float() for i in chosen])
        return cls.from_landmarks(face_model, decode, image, lms, energy, chunk, redetect_every, **speed)

    @classmethod
    def from_landmarks(cls, face_model, decode: Callable, image: torch.Tensor, landmarks: torch.Tensor,
                       energy: Energy, chunk: int = 0, redetect_every: int = 0, **speed) -> "IdentityGuidance":
        """The faces of ``image`` ((H, W, 3) or (1, H, W, 3)) at known ``landmarks`` ((F, 5, 2) or (5, 2), its
        pixels; e.g. a face crop's, from the detection on the photo) embedded as the references: no detection."""
        image = (image[0] if image.dim() == 4 else image)[..., :3].float()
        lms = landmarks.detach().float().reshape(-1, 5, 2)
        with torch.no_grad():
            ref = face_model.embed(image.permute(2, 0, 1)[None].expand(len(lms), -1, -1, -1).contiguous(), lms)
        return cls(face_model, decode, ref, lms, energy, tuple(image.shape[:2]), chunk, redetect_every, **speed)

    def _prepare(self):
        recognizer = getattr(self.face_model, "recognizer", None)
        if not self._thawed and isinstance(recognizer, torch.nn.Module):
            thaw_inference_tensors(recognizer)
        self._thawed = True

    def reset(self) -> None:
        """Forget re-detected landmarks: a new sampling run starts from the original's."""
        self._tracked = None

    def _original_landmarks(self, images: torch.Tensor) -> torch.Tensor:
        lms = thaw(self.face_landmarks).to(images.device)
        if self.image_size is not None and tuple(images.shape[-2:]) != tuple(self.image_size):
            h, w = self.image_size
            lms = lms * lms.new_tensor([images.shape[-1] / w, images.shape[-2] / h])
        return lms.expand(images.shape[0], -1, 5, 2)

    def landmarks_for(self, images: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The landmarks (B, F, 5, 2) aligning decoded ``images`` at sampler step ``step``, re-detected when due."""
        tracked = self._tracked
        if tracked is None or tracked.shape[0] != images.shape[0] or tracked.device != images.device:
            tracked = self._original_landmarks(images)
        if self.redetect_every > 0 and step and step % self.redetect_every == 0:
            tracked = tracked.detach().clone()
            with torch.no_grad():
                for b, image in enumerate(images.detach()):
                    faces = self.face_model.detect(image[:3].permute(1, 2, 0).clamp(0, 1).float())
                    for f in range(tracked.shape[1]):
                        nearest = _nearest_face(faces, tracked[b, f])
                        if nearest is not None:  # none near: keep the previous landmarks
                            tracked[b, f] = nearest.landmarks.to(tracked)
            self._tracked = tracked
        return tracked

    def _crop_geometry(self):
        """(template, crop size) of the recognizer's aligned crop, or None when the face model has none."""
        rec = getattr(self.face_model, "recognizer", None)
        if rec is None or not hasattr(rec, "template") or not hasattr(rec, "crop_size"):
            return None
        return rec.template(), int(rec.crop_size)

    def _decoding(self):
        """The context of a differentiable decode: gradient checkpointing through the decoder's blocks."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpointed_blocks(decoder_module(self.decode))
        return contextlib.nullcontext()

    def _embed_images(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        b, f = landmarks.shape[:2]
        crops = images if f == 1 else images.repeat_interleave(f, dim=0)
        emb = self.face_model.embed(crops, thaw(landmarks).reshape(b * f, 5, 2).contiguous())
        return emb.reshape(b, f, -1).float()

    def _embed(self, latent: torch.Tensor, step: int | None = None, landmarks: torch.Tensor | None = None):
        """Embeddings (B, F, D) of the decoded latents, and the landmarks (B, F, 5, 2) used."""
        if self.window_margin is not None:
            return self._embed_windows(latent, step, landmarks)
        with precision_context(self.precision, latent.device), self._decoding():
            images = self.decode(latent)
        if landmarks is None:  # re-detection outside autocast
            landmarks = self.landmarks_for(images, step)
        with precision_context(self.precision, latent.device):
            return self._embed_images(images, landmarks), landmarks

    def _embed_windows(self, latent: torch.Tensor, step: int | None, landmarks: torch.Tensor | None):
        """:meth:`_embed` decoding only the latent windows around the chosen faces' crops."""
        ds = int(getattr(self.decode, "downscale", 8))
        b, (h, w) = latent.shape[0], latent.shape[-2:]
        if landmarks is None:
            if self.redetect_every > 0 and step and step % self.redetect_every == 0:
                with torch.no_grad():  # re-detection looks at the whole frame
                    frame = self.decode(latent.detach())
            else:  # only the frame's size and device are read
                frame = latent.new_empty((b, 0, h * ds, w * ds))
            landmarks = self.landmarks_for(frame, step)
        template, crop = self._crop_geometry()
        emb = [None] * landmarks.shape[1]
        for window, faces in face_windows(landmarks, template, crop, (h, w), ds):
            shift = landmarks.new_tensor([window[2] * ds, window[0] * ds])
            with precision_context(self.precision, latent.device):
                with self._decoding():
                    images = decode_window(self.decode, latent, window, self.window_margin)
                for j, e in zip(faces, self._embed_images(images, landmarks[:, faces] - shift).unbind(1)):
                    emb[j] = e
        return torch.stack(emb, dim=1), landmarks

    def _embed_chunked(self, latent: torch.Tensor, step: int | None, chunk: int):
        """:meth:`_embed` of the whole batch (same landmarks, same tracking), decoding ``chunk`` samples at a time."""
        b = latent.shape[0]
        parts = range(0, b, chunk)
        if self.window_margin is None:
            with precision_context(self.precision, latent.device):
                images = torch.cat([self.decode(latent[s:s + chunk]) for s in parts])
            landmarks = self.landmarks_for(images, step)
            with precision_context(self.precision, latent.device):
                emb = torch.cat([self._embed_images(images[s:s + chunk], landmarks[s:s + chunk]) for s in parts])
            return emb, landmarks
        ds = int(getattr(self.decode, "downscale", 8))   # as _embed_windows reads it
        h, w = latent.shape[-2:]
        if self.redetect_every > 0 and step and step % self.redetect_every == 0:
            frames = torch.cat([self.decode(latent[s:s + chunk]) for s in parts])   # re-detection: whole frames
        else:  # only the frames' size and device are read
            frames = latent.new_empty((b, 0, h * ds, w * ds))
        landmarks = self.landmarks_for(frames, step)
        emb = torch.cat([self._embed_windows(latent[s:s + chunk], step, landmarks[s:s + chunk])[0] for s in parts])
        return emb, landmarks

    def embed(self, latent: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Embeddings of the decoded latents (differentiable when autograd is on): (B, D) for one face,
        (B, F, D) for several."""
        emb = self._embed(latent, step)[0]
        return emb[:, 0] if self.num_faces == 1 else emb

    def _total(self, emb: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """sum_f E(emb[:, f], ref_f): each face against its own original, the batch across outputs."""
        return sum(self.energy(emb[:, f], refs[f].to(emb)) for f in range(emb.shape[1]))

    def value(self, latent: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The energy of a batch of latents (a differentiable scalar under autograd)."""
        self._prepare()
        return self._total(self._embed(latent, step)[0], thaw(self.references))

    def energy_and_grad(self, latent: torch.Tensor, step: int | None = None) -> tuple[float, torch.Tensor]:
        """(E, dE/d latent) at a detached latent."""
        with gradients_enabled():
            self._prepare()
            z = thaw(latent).detach().float().requires_grad_(True)
            refs = thaw(self.references)
            n = z.shape[0]
            chunk = self.chunk if self.chunk > 0 else auto_chunk(self.decode, z)
            if chunk <= 0 or n <= chunk:
                energy = self._total(self._embed(z, step)[0], refs)
                (grad,) = torch.autograd.grad(energy, z)
                return float(energy.detach()), grad.to(latent.dtype)
            # Every sample's embedding first (the energy may couple the outputs, e.g. L_div), without gradients
            # and chunk by chunk too, so no pass ever holds more than ``chunk`` samples' activations.
            with torch.no_grad():
                emb_all, lms = self._embed_chunked(z, step, chunk)
            grad = torch.zeros_like(z)
            for s in range(0, n, chunk):
                zc = z[s:s + chunk].detach().requires_grad_(True)
                emb = torch.cat([emb_all[:s], self._embed(zc, landmarks=lms[s:s + chunk])[0], emb_all[s + chunk:]])
                energy = self._total(emb, refs)
                (grad[s:s + chunk],) = torch.autograd.grad(energy, zc)
            return float(energy.detach()), grad.to(latent.dtype)


def _nearest_face(faces, landmarks: torch.Tensor):
    """The detected face whose landmark centre is nearest to ``landmarks`` (5, 2), if within that face's size."""
    centre = landmarks.float().mean(0)
    best, best_d = None, float("inf")
    for face in faces:
        d = float((face.landmarks.float().mean(0).to(centre) - centre).norm())
        size = float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
        if d < best_d and d <= size:
            best, best_d = face, d
    return best


def _unet_dtype(model) -> torch.dtype:
    """The dtype the UNet behind a k-diffusion wrapper computes in (its manual cast dtype, else its weights')."""
    inner = getattr(getattr(model, "inner_model", None), "inner_model", None)
    dtype = getattr(inner, "manual_cast_dtype", None)
    if dtype is None and hasattr(inner, "get_dtype"):
        dtype = inner.get_dtype()
    return dtype or torch.float32


FP16_LOSS_SCALE = 2.0 ** 12


def _grad_through_unet(model, x, sigma, extra_args, guidance: IdentityGuidance, step: int):
    """(E, dE/dx, x0_hat) back-propagating through the UNet. An fp16 UNet gets its loss scaled, as Key-E learning
    does (small gradients underflow in fp16): by 2^12, divided by 16 and recomputed while the gradient overflows."""
    scale = FP16_LOSS_SCALE if _unet_dtype(model) == torch.float16 else 1.0
    while True:
        with gradients_enabled():
            thaw_diffusion_model(model)
            xg = thaw(x).detach().requires_grad_(True)
            denoised = model(xg, thaw(sigma), **extra_args)
            value = guidance.value(denoised, step=step)
            (grad_x,) = torch.autograd.grad(value * scale, xg)
        if scale <= 1.0 or bool(torch.isfinite(grad_x).all()):
            return float(value.detach()), grad_x / scale, denoised.detach()
        scale = max(1.0, scale / 16.0)


def sample_guided_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                       guidance: IdentityGuidance | None, scale: GuidanceScale | Callable | float = 1.0,
                       through_unet: bool = False, stats: list | None = None, realism=None):
    """Identity-guided DDIM (eta = 0) over ``sigmas``; k-diffusion convention, run it as a KSAMPLER.

    ``scale``: lambda_t as a number or a function of sigma. ``stats``: if a list, one dict per step
    (sigma, lambda, energy, gradient norm) is appended, for tests and benchmarks. ``guidance`` None: plain
    DDIM. ``realism``: DIFP's realism control (``guidance.ilvr.RealismControl``), applied right after each step.
    """
    extra_args = {} if extra_args is None else extra_args
    scale_of = scale if callable(scale) else (lambda _sigma: float(scale))
    for name, value in (("guidance scale above tau", scale_of(sigmas[0])), ("guidance scale below tau",
                                                                            scale_of(sigmas[-1]))):
        if not math.isfinite(value):
            raise ValueError(f"the {name} is {value}: give a finite number (the paper uses 1 to 2.5)")
    s_in = x.new_ones([x.shape[0]])
    if guidance is not None:
        guidance.reset()
    if realism is not None:
        realism.reset()
    for i in range(len(sigmas) - 1):
        check_interrupt()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        lam = scale_of(sigma) if guidance is not None else 0.0
        energy, grad = float("nan"), None
        if lam != 0.0 and through_unet:
            energy, grad_x, denoised = _grad_through_unet(model, x, sigma * s_in, extra_args, guidance, i)
            grad = grad_x * vp_scale(sigma)  # dE/dz_t
        else:
            with torch.no_grad():
                denoised = model(x, sigma * s_in, **extra_args)
            if lam != 0.0:
                energy, grad = guidance.energy_and_grad(denoised, step=i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        with torch.no_grad():
            if grad is not None and not bool(torch.isfinite(grad).all()):
                raise ValueError(f"the identity guidance gradient became non-finite at step {i} (sigma "
                                 f"{float(sigma):.3g}, energy {energy:.4g}): check the energy weights and the face "
                                 "model (a finite, non-zero diversity_weight / guidance scale); nothing was saved")
            x = ddim_step(x, denoised, sigma, sigma_next)
            if grad is not None:
                x = x - lam * vp_scale(sigma_next) * grad.to(x)
            if realism is not None:
                x = realism(x, sigma_next, i, len(sigmas) - 1)
            check_finite(x, f"the guided latent at step {i} (lambda {lam:g})")
        if stats is not None:
            stats.append({"i": i, "sigma": float(sigma), "lambda": lam, "energy": energy,
                          "grad_norm": float(grad.norm()) if grad is not None else 0.0})
    return x


def guided_ddim_sampler(guidance: IdentityGuidance | None, scale: GuidanceScale | Callable | float = 1.0,
                        through_unet: bool = False, stats: list | None = None, realism=None):
    """A native SAMPLER (``comfy.samplers.KSAMPLER``) running :func:`sample_guided_ddim`."""
    import comfy.samplers
    return comfy.samplers.KSAMPLER(sample_guided_ddim, extra_options={
        "guidance": guidance, "scale": scale, "through_unet": through_unet, "stats": stats, "realism": realism})
