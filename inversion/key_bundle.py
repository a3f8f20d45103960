"""A key bundle: Key-I (the DDIM-inverted latent) and Key-E (the ten stage conditionings) in one key
file, with the settings recovery needs. Converts between ComfyUI's LATENT / CONDITIONING and the
file's tensors; the file format itself is :mod:`.keyfile`, Key-E's forms :class:`.key_e.KeyE`."""
from __future__ import annotations

import json

import torch

from ..guidance.working_image import check_working_size
from .key_check import LATENT_SCALE, key_e_provenance, key_i_from_file
from .key_e import KeyE
from .keyfile import (KEY_E, KEY_E_POOLED, KEY_I, META_CLIP_FINGERPRINT, META_FACE_CROPS, META_IMAGE_HEIGHT,
                      META_IMAGE_WIDTH, META_MODEL_FINGERPRINT, metadata_number)

# LATENT entry of a Key-I made on face crops: one plan dict per photo (methods.pipeline.Plan.as_dict), its latents
# in the order of the plans' crops. Save Key writes one key file per photo with its plan (META_FACE_CROPS).
KEY_I_CROPS = "diffprivacy_crops"


def bundle_tensors(key_i: dict, key_e, crops: int = 1) -> dict:
    """Key tensors from a LATENT (Key-I: one working image, or ``crops`` face crops of one photo) and a stage
    CONDITIONING (Key-E, ten entries or a batch of ten)."""
    samples = key_i.get("samples") if isinstance(key_i, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] != crops:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else None
        raise ValueError(f"key_i must be a LATENT of {crops} image(s), [{crops}, channels, h, w]; got samples of "
                         f"shape {shape}")
    return {KEY_I: samples, **KeyE.from_conditioning(key_e, allow_text=False).to_tensors()}


USE_SAVED = "use the key file Save Key wrote, unchanged"
MAX_KEY_E_TOKENS = 77 * 32  # a prompt of 32 chunks of 77 tokens; Save Key writes 77 per chunk
MAX_KEY_E_WIDTH = 4096
MAX_FACE_CROPS = 256    # face crops one key file may hold (one photo's faces)


def check_key_sizes(tensors: dict, metadata: dict) -> None:
    """Refuse a key bundle whose shapes disagree with each other or with the metadata, or exceed what these nodes
    make (:data:`guidance.working_image.MAX_SIDE` a side), before any work: a consistent 4096x4096 key ran for
    over 14 minutes."""
    key_i, key_e = tensors[KEY_I], tensors[KEY_E]
    height, width = key_i.shape[2] * LATENT_SCALE, key_i.shape[3] * LATENT_SCALE
    if META_IMAGE_WIDTH in metadata and META_IMAGE_HEIGHT in metadata:
        size = (metadata_number(metadata, META_IMAGE_HEIGHT, int), metadata_number(metadata, META_IMAGE_WIDTH, int))
        if size != (height, width):
            raise ValueError(f"this key file is malformed: Key-I holds the latent of a {width}x{height} image but "
                             f"the file records {size[1]}x{size[0]}: {USE_SAVED}")
    check_working_size(width, height, "this key's image (its Key-I)", f"a key this large is not one these nodes make; "
                       f"{USE_SAVED}")
    if not 1 <= key_i.shape[1] <= 16:
        raise ValueError(f"this key file is malformed: Key-I has {key_i.shape[1]} latent channels (SD-family models "
                         f"have 4): {USE_SAVED}")
    if key_e.ndim != 3 or not (1 <= key_e.shape[1] <= MAX_KEY_E_TOKENS and 1 <= key_e.shape[2] <= MAX_KEY_E_WIDTH):
        raise ValueError(f"this key file is malformed: Key-E has shape {tuple(key_e.shape)}, expected [10, tokens, "
                         f"width] with at most {MAX_KEY_E_TOKENS} tokens of width at most {MAX_KEY_E_WIDTH}: "
                         f"{USE_SAVED}")
    pooled = tensors.get(KEY_E_POOLED)
    if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != key_e.shape[0]
                               or pooled.shape[1] > MAX_KEY_E_WIDTH):
        raise ValueError(f"this key file is malformed: its pooled Key-E has shape {tuple(pooled.shape)}, expected "
                         f"[{key_e.shape[0]}, width]: {USE_SAVED}")


def crop_plans(key_i) -> list[dict] | None:
    """The face-crop plans a Key-I LATENT carries (one per photo), or None for a whole-frame Key-I."""
    plans = key_i.get(KEY_I_CROPS) if isinstance(key_i, dict) else None
    return plans if plans else None


def bundle_from_tensors(tensors: dict, metadata: dict):
    """(LATENT, CONDITIONING with one entry of batch ten) from a key file's tensors, each carrying the provenance
    the file records (step count, image size, fingerprints: :mod:`.key_check`)."""
    from .keyfile import refuse_difp
    refuse_difp(metadata)  # a DIFP key file: say which node reads it
    if KEY_I not in tensors or KEY_E not in tensors:
        missing = [n for n in (KEY_I, KEY_E) if n not in tensors]
        raise ValueError(f"this key file holds no {' / '.join(missing)} (is it a Key-E training file rather than "
                         "a key bundle?)")
    key_i = tensors[KEY_I]
    plan = None
    if META_FACE_CROPS in metadata:
        try:
            plan = json.loads(metadata[META_FACE_CROPS])
            count = len(plan["crops"])
        except (ValueError, KeyError, TypeError):
            raise ValueError("this key file is malformed: its face-crop record is not valid JSON") from None
    else:
        count = 1
        if not 1 <= count <= MAX_FACE_CROPS:
            raise ValueError(f"this key file is malformed: it records {count} face crops (1 to {MAX_FACE_CROPS}): "
                             f"{USE_SAVED}")
    if key_i.ndim != 4 or key_i.shape[0] != count:
        raise ValueError(f"this key file is malformed: Key-I has shape {tuple(key_i.shape)}, expected [{count}, C, h, "
                         f"w] (one latent per face crop): {USE_SAVED}")
    check_key_sizes(tensors, metadata)  # shapes against each other and against the bound, before any work
    key_e = KeyE.from_tensors(tensors)
    provenance = key_e_provenance(metadata.get(META_MODEL_FINGERPRINT), metadata.get(META_CLIP_FINGERPRINT))
    latent = key_i_from_file(key_i.float(), metadata)
    if plan is not None:
        latent[KEY_I_CROPS] = [plan]
    return latent, key_e.with_provenance(provenance).to_conditioning()
