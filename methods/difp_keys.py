"""DIFP's keys and recovery (You et al. 2024, Sec. 3.3.3, Eqs. 15-18), on the pack's Key-I machinery.

- F_i: DDIM inversion of the original's latent to S_n * T (Eq. 15) under the key's text condition, with the
  checkpoint's MODEL (no identity/style streams): :func:`..inversion.ddim.ddim_invert`, carried as a Key-I LATENT
  (steps, noise level, model fingerprint, image size: :mod:`.key_check`).
- F_e: the conditions used (the text CONDITIONING) and the original's identity embedding with its 5 landmarks,
  in the recognizer named in the key.

Recovery: deterministic DDIM from F_i under the key's text condition (Eq. 16 as printed is not a DDIM update;
the standard one is used), with the gradient correction of Eq. 17 adapted: D = cosine distance between the
decoded x0_hat's face and the identity embedding stored in the key (Eq. 17 as printed compares with the
original image, which the key holder does not have). It never reads the protected image.

One key file per image, in the pack's sealed format (:mod:`.keyfile`) with the kind tag ``key_kind = difp``
inside the (sealed) metadata; Diff-Privacy key bundles carry no tag (or ``diff-privacy``), and each loader
refuses the other kind, saying which node reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..guidance.ddim import ddim_sigmas
from .difp import check_strength, without_stream_flags
from ..guidance.energy import hide_energy
from ..guidance.guided_ddim import IdentityGuidance, guided_ddim_sampler
from ..guidance.sampling import sample_with_comfy
from ..guidance.vae_decode import make_vae_decoder
from ..guidance.working_image import check_working_size
from ..inversion.ddim import ddim_invert
from ..inversion.fingerprint import model_fingerprint
from ..inversion.key_check import LATENT_SCALE, check_keys, key_i_latent
from ..inversion.keyfile import (KIND_DIFF_PRIVACY, KIND_DIFP, KIND_FIELD, key_kind, META_FACE_CROPS,
                                 META_IMAGE_HEIGHT,
                                 META_IMAGE_WIDTH, META_MODEL_FINGERPRINT, META_STEPS, META_STRENGTH, metadata_number,
                                 read_key_file, write_key_file)

F_I = "difp_f_i"
TEXT = "difp_text"
TEXT_POOLED = "difp_text_pooled"
IDENTITY = "difp_identity"
LANDMARKS = "difp_landmarks"
META_FACE_MODEL = "face_model"


def refuse_non_difp(metadata: dict) -> None:
    kind = key_kind(metadata)
    if kind != KIND_DIFP:
        raise ValueError(f"this is a {'Diff-Privacy' if kind == KIND_DIFF_PRIVACY else kind!r} key file (Key-I + "
                         "Key-E), not a DIFP key: load it with Load Key (Diff-Privacy) and recover with Diff-Privacy "
                         "Recover")


@dataclass
class DIFPKey:
    """The DIFP_KEY value: F_i (a Key-I LATENT with provenance) and F_e (text condition, identity, landmarks)."""
    f_i: dict
    conditioning: list
    identity: torch.Tensor    # (1, D)
    landmarks: torch.Tensor   # (1, 5, 2), pixels of the working image
    face_model: str
    steps: int
    strength: float
    face_crops: dict | None = None  # where the face crop was cut from the photo (methods.pipeline.Plan.as_dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        s = self.f_i["samples"]
        return int(s.shape[-2]) * LATENT_SCALE, int(s.shape[-1]) * LATENT_SCALE


def _text(conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(conditioning, list) or len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise ValueError("the DIFP text condition must be one CONDITIONING entry of batch one (e.g. the empty prompt)")
    emb, extra = conditioning[0]
    return emb, extra.get("pooled_output")


def make_difp_key(model, conditioning, vae_latent: torch.Tensor, steps: int, strength: float,
                  identity: torch.Tensor, landmarks: torch.Tensor, face_model_name: str) -> DIFPKey:
    """F_i by DDIM inversion of ``vae_latent`` (1, C, h, w) to S_n * T; F_e from the other arguments."""
    check_strength(strength)
    if vae_latent.dim() != 4 or vae_latent.shape[0] != 1:
        raise ValueError(f"a DIFP key belongs to one image; got a latent of shape {tuple(vae_latent.shape)}")
    _text(conditioning)
    sigmas = ddim_sigmas(model.get_model_object("model_sampling"), steps, strength)
    f_i = sample_with_comfy(model, ddim_invert, sigmas, without_stream_flags(conditioning), vae_latent)
    latent = key_i_latent(f_i, steps=steps, sigma=float(sigmas[0]), model_fingerprint=model_fingerprint(model),
                          clip_fingerprint=None)
    return DIFPKey(latent, conditioning, identity.detach().float().reshape(1, -1).cpu(),
                   landmarks.detach().float().reshape(1, 5, 2).cpu(), str(face_model_name), int(steps), float(strength))


def key_to_file(key: DIFPKey) -> tuple[dict, dict]:
    """(tensors, metadata) of a key file."""
    emb, pooled = _text(key.conditioning)
    tensors = {F_I: key.f_i["samples"], TEXT: emb, IDENTITY: key.identity, LANDMARKS: key.landmarks}
    if pooled is not None:
        tensors[TEXT_POOLED] = pooled
    h, w = key.image_size
    metadata = {KIND_FIELD: KIND_DIFP, META_STEPS: str(key.steps), META_STRENGTH: repr(key.strength),
                META_IMAGE_WIDTH: str(w), META_IMAGE_HEIGHT: str(h), META_FACE_MODEL: key.face_model,
                META_MODEL_FINGERPRINT: key.f_i["diffprivacy_key_i"].get(META_MODEL_FINGERPRINT) or ""}
    if key.face_crops is not None:
        metadata[META_FACE_CROPS] = json.dumps(key.face_crops, sort_keys=True)
    return tensors, metadata


def write_difp_key(path, key: DIFPKey, password: str | None = None, **kw):
    tensors, metadata = key_to_file(key)
    return write_key_file(path, tensors, metadata, password or None, **kw)


def key_from_file(tensors: dict, metadata: dict) -> DIFPKey:
    refuse_non_difp(metadata)
    missing = [n for n in (F_I, TEXT, IDENTITY, LANDMARKS) if n not in tensors]
    if missing:
        raise ValueError(f"this DIFP key file is malformed: it holds no {', '.join(missing)}")
    f_i = tensors[F_I].float()
    if f_i.dim() != 4 or f_i.shape[0] != 1:
        raise ValueError(f"this DIFP key file is malformed: F_i has shape {tuple(f_i.shape)}, expected [1, C, h, w]")
    steps = metadata_number(metadata, META_STEPS, int)
    strength = metadata_number(metadata, META_STRENGTH)
    size = (metadata_number(metadata, META_IMAGE_HEIGHT, int), metadata_number(metadata, META_IMAGE_WIDTH, int))
    if size != (f_i.shape[2] * LATENT_SCALE, f_i.shape[3] * LATENT_SCALE):
        raise ValueError(f"this DIFP key file is malformed: F_i {tuple(f_i.shape)} does not match its recorded image "
                         f"size {size[1]}x{size[0]}")
    check_working_size(size[1], size[0], "this DIFP key's image (its F_i)", "a key this large is not one these nodes "
                       "make; use the key file Save DIFP Key wrote, unchanged")
    latent = key_i_latent(f_i, steps=steps, sigma=None, model_fingerprint=metadata.get(META_MODEL_FINGERPRINT) or None,
                          clip_fingerprint=None)
    extra = {"pooled_output": tensors[TEXT_POOLED]} if TEXT_POOLED in tensors else {}
    try:
        crops = json.loads(metadata[META_FACE_CROPS]) if META_FACE_CROPS in metadata else None
    except ValueError:
        raise ValueError("this DIFP key file is malformed: its face-crop record is not valid JSON") from None
    return DIFPKey(latent, [[tensors[TEXT], extra]], tensors[IDENTITY].float(), tensors[LANDMARKS].float(),
                   metadata.get(META_FACE_MODEL, ""), steps, strength, crops)


def read_difp_key(path, password: str | None = None) -> DIFPKey:
    tensors, metadata = read_key_file(path, password or None)
    return key_from_file(tensors, metadata)


def recovery_guidance(model, vae, face_model, key: DIFPKey) -> IdentityGuidance:
    """Eq. 17 adapted: D = 1 - cos(F(Dec(x0_hat)), the key's identity), aligned with the key's landmarks."""
    if face_model.name != key.face_model:
        raise ValueError(f"this key stores the original's identity as {key.face_model!r} embeddings; the connected "
                         f"face model is {face_model.name!r}: connect the face model the key was made with")
    return IdentityGuidance(face_model, make_vae_decoder(vae, model), key.identity, key.landmarks, hide_energy(),
                            image_size=key.image_size)


def recover(model, vae, face_model, key: DIFPKey, steps: int | None = None, guidance_scale: float = 1.0,
            stats: list | None = None) -> torch.Tensor:
    """The recovered latent (VAE space): DDIM from F_i under the key's condition with the Eq. 17 correction.

    Refuses a key of another model, image size or step count (``steps`` None: the key's own)."""
    steps = key.steps if steps is None else int(steps)
    check_keys(key.f_i, None, model=model, steps=steps)
    sigmas = ddim_sigmas(model.get_model_object("model_sampling"), steps, key.strength)
    guidance = None
    if guidance_scale != 0.0:
        if face_model is None or vae is None:
            raise ValueError("recovery with the identity correction (guidance_scale > 0) needs the VAE and the face "
                             "model the key was made with; set guidance_scale 0 for plain DDIM")
        guidance = recovery_guidance(model, vae, face_model, key)
    sampler = guided_ddim_sampler(guidance, float(guidance_scale), stats=stats)
    return sample_with_comfy(model, sampler, sigmas, key.conditioning, key.f_i["samples"])
