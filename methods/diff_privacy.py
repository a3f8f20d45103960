"""Diff-Privacy Stage II (paper Sec. 2.3.3-2.3.4, Alg. 1 lines 4-8): anonymization and visual identity
hiding as one function each, on the guided DDIM sampler of :mod:`.guided_ddim`.

Both noise the working image's latent to ``sigmas[0]`` (strength S_ns of an S-step DDIM grid) and
denoise it under the embedding schedule (Key-E above tau, UC below) while identity guidance moves
every step against an energy of the face's embedding:

* anonymization: E = L_Idis + w_div * L_div (away from the original, and the outputs apart), lambda
  constant (paper: 1), four independent noisings;
* hiding: E = L_is (recognisers keep the identity while people do not), lambda 1.5 above tau and
  2.5 below (reference code), the face re-detected every 10 steps since the strong noising lets it move.

The schedule arrives as a native CONDITIONING (built from Key-E by the caller), so this module does not
know where Key-E came from.

:data:`ANONYMIZE` and :data:`HIDE` are the two tasks behind the pack's one method contract (:mod:`.contract`):
each crop is protected with its own Key-E (``models.extra["key_es"][(photo, position)]``, UC in
``models.extra["uncond"]``), steering the face its crop was cut around.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..guidance.ddim import ddim_sigmas
from ..guidance.energy import Energy, anonymize_energy, hide_energy
from ..guidance.gradient_path import GradientOptions, make_gradient_decoder, resolve_precision, to_channels_last
from ..guidance.guided_ddim import GuidanceScale, IdentityGuidance, guided_ddim_sampler, stage_guidance_scale
from ..guidance.progress import Progress, report
from ..guidance.sampling import sample_with_comfy
from ..guidance.weights import require_finite
from ..guidance.working_image import working_mask
from .contract import CropJob, FaceResult, Method, MethodResult, Models


@dataclass
class Protection:
    """What a protection run returns: images and latents, and its parts for rewiring with stock nodes."""
    images: torch.Tensor   # IMAGE (N, H, W, 3)
    latents: dict          # LATENT
    sampler: object        # SAMPLER (comfy.samplers.KSAMPLER)
    sigmas: torch.Tensor   # SIGMAS


def model_sampling(model):
    return model.get_model_object("model_sampling")


@dataclass
class FaceChoice:
    """Which faces of the photo guidance steers: "all", "largest", "indices" (e.g. "0, 2") or "mask"."""
    mode: str = "all"
    indices: str = ""
    mask: torch.Tensor | None = None  # (h, w) at the working image's size
    landmarks: torch.Tensor | None = None  # (F, 5, 2) the chosen faces, known (a face crop's): not detected again


def build_guidance(model, vae, face_model, image: torch.Tensor, energy: Energy, gradient_chunk: int = 0,
                   redetect_every: int = 0, faces: FaceChoice | None = None,
                   gradient: GradientOptions | None = None) -> IdentityGuidance:
    """Identity guidance with the chosen faces of ``image`` (a working image, one) as the references.

    ``gradient``: how the gradient decodes (decoder, face window, chunking, precision, flags); without it the
    full VAE on the whole frame with ``gradient_chunk``.
    """
    faces = faces or FaceChoice("largest")
    options = gradient or GradientOptions(chunk=gradient_chunk)
    decode = make_gradient_decoder(vae, model, options)
    if options.channels_last:
        to_channels_last(getattr(face_model, "recognizer", None), "the face recognizer")
    device = getattr(vae, "device", None) or torch.device("cpu")
    speed = dict(checkpointing=options.checkpointing, precision=resolve_precision(options.precision, device),
                 window_margin=options.window_margin if options.face_window else None)
    if faces.landmarks is not None:
        return IdentityGuidance.from_landmarks(face_model, decode, image[0], faces.landmarks, energy,
                                               chunk=options.chunk, redetect_every=redetect_every, **speed)
    return IdentityGuidance.from_image(face_model, decode, image[0], energy, chunk=options.chunk,
                                       redetect_every=redetect_every, choice=faces.mode, indices=faces.indices,
                                       mask=faces.mask, **speed)


def guided_sampler(model, vae, face_model, image: torch.Tensor, task: str, tau: float, lambda_above: float,
                   lambda_below: float, diversity_weight: float = 1.0, through_unet: bool = False,
                   redetect_every: int = 0, faces: FaceChoice | None = None, gradient_chunk: int = 0,
                   gradient: GradientOptions | None = None):
    """The identity-guided DDIM of a task ("anonymize" or "hide") as a native SAMPLER."""
    if task not in ("anonymize", "hide"):
        raise ValueError(f"task must be 'anonymize' or 'hide', got {task!r}")
    energy = anonymize_energy(1.0, diversity_weight) if task == "anonymize" else hide_energy()
    guidance = build_guidance(model, vae, face_model, image, energy, gradient_chunk, redetect_every, faces, gradient)
    scale = stage_guidance_scale(model_sampling(model), tau, lambda_above, lambda_below)
    return guided_ddim_sampler(guidance, scale, through_unet=through_unet)


def run_protection(model, vae, image: torch.Tensor, guidance: IdentityGuidance, scale: GuidanceScale | float,
                   schedule, steps: int, strength: float, seed: int, num_outputs: int) -> Protection:
    """Noise the working image's latent ``num_outputs`` times to sigmas[0] (seeded: one independent noising
    per output) and denoise every copy together with the guided DDIM under ``schedule``."""
    import comfy.sample

    sampler = guided_ddim_sampler(guidance, scale)
    sigmas = ddim_sigmas(model_sampling(model), steps, strength)
    batch = vae.encode(image).repeat(num_outputs, 1, 1, 1)
    noise = comfy.sample.prepare_noise(batch, seed)
    samples = sample_with_comfy(model, sampler, sigmas, schedule, batch, noise, seed)
    return Protection(vae.decode(samples), {"samples": samples}, sampler, sigmas)


def anonymize(model, vae, face_model, image: torch.Tensor, schedule, *, seed: int, steps: int = 50,
              strength: float = 0.6, num_outputs: int = 4, guidance_scale: float = 1.0,
              diversity_weight: float = 1.0, faces: FaceChoice | None = None, gradient_chunk: int = 0,
              gradient: GradientOptions | None = None) -> Protection:
    """Anonymization (Sec. 2.3.3) with the paper's defaults; ``image`` is the working image (one)."""
    guidance = build_guidance(model, vae, face_model, image, anonymize_energy(1.0, diversity_weight),
                              gradient_chunk, faces=faces, gradient=gradient)
    return run_protection(model, vae, image, guidance, float(guidance_scale), schedule, steps, strength, seed,
                          num_outputs)


def hide(model, vae, face_model, image: torch.Tensor, schedule, *, seed: int, tau: float = 0.6, steps: int = 100,
         strength: float = 0.8, num_outputs: int = 1, lambda_above: float = 1.5, lambda_below: float = 2.5,
         redetect_every: int = 10, faces: FaceChoice | None = None, gradient_chunk: int = 0,
         gradient: GradientOptions | None = None) -> Protection:
    """Visual identity hiding (Sec. 2.3.4) with the reference code's defaults; ``tau`` must be the schedule's."""
    guidance = build_guidance(model, vae, face_model, image, hide_energy(), gradient_chunk, redetect_every, faces,
                              gradient)
    scale = stage_guidance_scale(model_sampling(model), tau, lambda_above, lambda_below)
    return run_protection(model, vae, image, guidance, scale, schedule, steps, strength, seed, num_outputs)


@dataclass(frozen=True)
class ProtectionSettings:
    """The settings of Anonymize (``task = "anonymize"``) and Hide (``"hide"``), validated once when built.

    ``faces``/``face_indices``/``face_mask``: which faces guidance steers in a whole-frame crop (in a face crop it
    steers the face the crop was cut around)."""
    task: str
    seed: int
    steps: int
    strength: float
    tau: float
    num_outputs: int = 1
    guidance_scale: float = 1.0       # anonymize: lambda
    diversity_weight: float = 1.0     # anonymize: w_div
    lambda_above: float = 1.5         # hide: lambda where t > tau*T
    lambda_below: float = 2.5         # hide: lambda where t <= tau*T
    redetect_every: int = 0           # hide: re-find the face every k steps
    faces: str = "all"
    face_indices: str = ""
    face_mask: torch.Tensor | None = field(default=None, compare=False)
    gradient: GradientOptions | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.task not in ("anonymize", "hide"):
            raise ValueError(f"task must be 'anonymize' or 'hide', got {self.task!r}")
        for name in ("strength", "tau", "guidance_scale", "diversity_weight", "lambda_above", "lambda_below"):
            require_finite(getattr(self, name), name)
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        for name, low in (("seed", 0), ("steps", 1), ("num_outputs", 1), ("redetect_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")

    def face_choice(self, job: CropJob) -> FaceChoice:
        if job.crop.face_index >= 0:  # a face crop: the face it was cut around, where the photo's detection put it
            return FaceChoice("mask", "", job.face_mask(), job.crop.working_landmarks(job.resolution))
        return FaceChoice(self.faces, self.face_indices, working_mask(self.face_mask, job.photo,
                                                                      tuple(job.image.shape[1:3])))


def run(crops: list, models: Models, settings: ProtectionSettings, progress: Progress | None = None) -> MethodResult:
    """The contract's run: each crop protected with its own Key-E under the task's energy."""
    key_es, uncond = models.extra["key_es"], models.extra["uncond"]
    faces = []
    for n, job in enumerate(crops):
        report(progress, n, len(crops), f"face {n + 1}/{len(crops)}")
        key_e = key_es[(job.photo, job.position)]
        schedule = key_e.schedule(uncond, settings.tau)
        common = dict(seed=settings.seed, steps=settings.steps, strength=settings.strength,
                      num_outputs=settings.num_outputs, faces=settings.face_choice(job),
                      gradient=settings.gradient or GradientOptions())
        if settings.task == "anonymize":
            out = anonymize(models.model, models.vae, models.face_model, job.image, schedule,
                            guidance_scale=settings.guidance_scale, diversity_weight=settings.diversity_weight,
                            **common)
        else:
            out = hide(models.model, models.vae, models.face_model, job.image, schedule, tau=settings.tau,
                       lambda_above=settings.lambda_above, lambda_below=settings.lambda_below,
                       redetect_every=settings.redetect_every, **common)
        faces.append(FaceResult(out.images, {"face": job.crop.face_index, "outputs": int(out.images.shape[0])},
                                key=key_e, parts={"latents": out.latents, "sampler": out.sampler,
                                                  "sigmas": out.sigmas, "schedule": schedule}))
    report(progress, len(crops), len(crops), "done")
    return MethodResult(faces)


def _task(task: str):
    def run_task(crops, models, settings, progress=None):
        if settings.task != task:
            raise ValueError(f"the {task} method was given settings for {settings.task}")
        return run(crops, models, settings, progress)
    return run_task


ANONYMIZE = Method("Diff-Privacy anonymize", _task("anonymize"), ProtectionSettings)
HIDE = Method("Diff-Privacy hide", _task("hide"), ProtectionSettings)
