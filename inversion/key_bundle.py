"""A key bundle: Key-I (the DDIM-inverted latent) and Key-E (the ten stage conditionings) in one key
file, with the settings recovery needs. Converts between ComfyUI's LATENT / CONDITIONING and the
file's tensors; the file format itself is :mod:`.keyfile`, Key-E's forms :class:`.key_e.KeyE`."""
from __future__ import annotations

import torch

from .key_check import LATENT_SCALE, key_e_provenance, key_i_from_file
from .key_e import KeyE
from .keyfile import (KEY_E, KEY_I, META_CLIP_FINGERPRINT, META_IMAGE_HEIGHT, META_IMAGE_WIDTH, META_MODEL_FINGERPRINT,
                      metadata_number)


def bundle_tensors(key_i: dict, key_e) -> dict:
    """Key tensors from a LATENT (Key-I) and a stage CONDITIONING (Key-E, ten entries or a batch of ten)."""
    samples = key_i.get("samples") if isinstance(key_i, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] != 1:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else None
        raise ValueError(f"key_i must be a LATENT of one image, [1, channels, h, w]; got samples of shape {shape}")
    return {KEY_I: samples, **KeyE.from_conditioning(key_e, allow_text=False).to_tensors()}


def bundle_from_tensors(tensors: dict, metadata: dict):
    """(LATENT, CONDITIONING with one entry of batch ten) from a key file's tensors, each carrying the provenance
    the file records (step count, image size, fingerprints: :mod:`.key_check`)."""
    from .difp_keys import refuse_difp
    refuse_difp(metadata)  # a DIFP key file: say which node reads it
    if KEY_I not in tensors or KEY_E not in tensors:
        missing = [n for n in (KEY_I, KEY_E) if n not in tensors]
        raise ValueError(f"this key file holds no {' / '.join(missing)} (is it a Key-E training file rather than "
                         "a key bundle?)")
    key_i = tensors[KEY_I]
    if key_i.ndim != 4 or key_i.shape[0] != 1:
        raise ValueError(f"this key file is malformed: Key-I has shape {tuple(key_i.shape)}, expected [1, C, h, w]")
    key_e = KeyE.from_tensors(tensors)
    if META_IMAGE_WIDTH in metadata and META_IMAGE_HEIGHT in metadata:
        size = (metadata_number(metadata, META_IMAGE_HEIGHT, int), metadata_number(metadata, META_IMAGE_WIDTH, int))
        if size != (key_i.shape[2] * LATENT_SCALE, key_i.shape[3] * LATENT_SCALE):
            raise ValueError(f"this key file is malformed: Key-I of shape {tuple(key_i.shape)} does not match "
                             f"its recorded image size {size[1]}x{size[0]}")
    provenance = key_e_provenance(metadata.get(META_MODEL_FINGERPRINT), metadata.get(META_CLIP_FINGERPRINT))
    return key_i_from_file(key_i.float(), metadata), key_e.with_provenance(provenance).to_conditioning()
