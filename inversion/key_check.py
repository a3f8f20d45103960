"""Where a key came from, carried with the key, and the checks that refuse a key used with the wrong settings.

Key-I travels as a LATENT and Key-E as CONDITIONING, through any node. So that recovery can check every key
whatever node it came from (without relying on optional inputs being wired), each carries its provenance:

- a Key-I LATENT carries ``diffprivacy_key_i`` = {steps, sigma, model_fingerprint, clip_fingerprint,
  image_width, image_height}: Make Key-I records it, Load Key rebuilds it from the key file (with the same
  field names as the key file's metadata; sigma is None there);
- a Key-E CONDITIONING entry carries ``diffprivacy_key_e`` = {model_fingerprint, clip_fingerprint}: the
  diffusion model it was learnt with (None for a Key-E encoded from text) and the text encoder it came from.
  A conditioning made by stock nodes carries none: its text encoder is unknown and is not checked.

Every refusal says what to set. Fingerprints are compared with :mod:`.fingerprint`'s rules (older ``dp1-``
text-encoder prints cannot be checked and are skipped).
"""
from __future__ import annotations

import logging

from ..guidance.working_image import check_working_size
from .fingerprint import clip_fingerprint, comparable, model_fingerprint, same_clip, same_model
from .keyfile import (META_CLIP_FINGERPRINT, META_IMAGE_HEIGHT, META_IMAGE_WIDTH, META_MODEL_FINGERPRINT,
                      META_STEPS, metadata_number)

log = logging.getLogger("diffprivacy")

KEY_I_INFO = "diffprivacy_key_i"  # LATENT entry: the Key-I's provenance
KEY_E_INFO = "diffprivacy_key_e"  # CONDITIONING extra: the Key-E's provenance
LATENT_SCALE = 8                  # pixels per latent cell (SD-family VAEs)

MODEL_ADVICE = ("connect the checkpoint the key was made with (with the same LoRAs or other patches, if any were "
                "applied then)")
CLIP_ADVICE = "connect the text encoder (CLIP) of the checkpoint the key was made with"


# ---------------------------------------------------------------- provenance

def key_i_latent(samples, *, steps: int | None, sigma: float | None, model_fingerprint: str | None,
                 clip_fingerprint: str | None) -> dict:
    """A Key-I LATENT: ``samples`` [1, C, h, w] and its provenance (the image size is read from the latent)."""
    return {"samples": samples, KEY_I_INFO: {
        META_STEPS: None if steps is None else int(steps), "sigma": None if sigma is None else float(sigma),
        META_MODEL_FINGERPRINT: model_fingerprint, META_CLIP_FINGERPRINT: clip_fingerprint,
        META_IMAGE_WIDTH: int(samples.shape[-1]) * LATENT_SCALE,
        META_IMAGE_HEIGHT: int(samples.shape[-2]) * LATENT_SCALE}}


def key_i_from_file(samples, metadata: dict) -> dict:
    """A Key-I LATENT as recorded in a key file: its steps, fingerprints and image size from the metadata."""
    steps = metadata_number(metadata, META_STEPS, int) if META_STEPS in metadata else None
    latent = key_i_latent(samples, steps=steps, sigma=None,
                          model_fingerprint=metadata.get(META_MODEL_FINGERPRINT),
                          clip_fingerprint=metadata.get(META_CLIP_FINGERPRINT))
    info = latent[KEY_I_INFO]
    for field in (META_IMAGE_WIDTH, META_IMAGE_HEIGHT):
        if field in metadata:
            info[field] = metadata_number(metadata, field, int)
    return latent


def key_i_info(key_i) -> dict | None:
    """The provenance a Key-I LATENT carries, or None for a LATENT that is not a Key-I."""
    info = key_i.get(KEY_I_INFO) if isinstance(key_i, dict) else None
    return info if isinstance(info, dict) else None


def key_e_provenance(model_print: str | None, clip_print: str | None) -> dict:
    """A Key-E's provenance: the fingerprints of the model it was learnt with (None for a text Key-E) and of
    its text encoder."""
    return {META_MODEL_FINGERPRINT: model_print, META_CLIP_FINGERPRINT: clip_print}


# ---------------------------------------------------------------- checks

def _fingerprint_problems(recorded: dict, what: str, model=None, clip=None) -> list[str]:
    """Problems of recorded model/text-encoder fingerprints against a connected MODEL / CLIP."""
    problems = []
    have = recorded.get(META_MODEL_FINGERPRINT)
    if model is not None and have and not same_model(have, model):
        problems.append(f"{what} was made for another diffusion model (key: {have}, connected model: "
                        f"{model_fingerprint(model)}): {MODEL_ADVICE}")
    have = recorded.get(META_CLIP_FINGERPRINT)
    if clip is not None and have:
        same = same_clip(have, clip)
        if same is None:
            log.warning("[Diff-Privacy] %s records a text-encoder fingerprint of an older version of these nodes "
                        "(%s), which cannot be checked; the text encoder is not checked", what, have)
        elif not same:
            problems.append(f"{what} was made with another text encoder (key: {have}, connected CLIP: "
                            f"{clip_fingerprint(clip)}): {CLIP_ADVICE}")
    return problems


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("this key does not fit: " + "; ".join(problems))


def check_key_file(metadata: dict, *, model=None, clip=None, steps: int | None = None,
                   image_size: tuple[int, int] | None = None) -> None:
    """Raise ValueError naming every way a key file (its metadata) does not fit what it is used with.

    ``model`` / ``clip``: the MODEL / CLIP it is used with; ``image_size``: (width, height) in pixels.
    Arguments left None are not checked; a field the file does not record is named.
    """
    problems = []
    for field, what, given in ((META_MODEL_FINGERPRINT, "diffusion model", model),
                               (META_CLIP_FINGERPRINT, "text encoder", clip),
                               (META_STEPS, "step count", steps)):
        if given is not None and metadata.get(field) is None:
            problems.append(f"the key file does not record its {what}")
    if image_size is not None and (metadata.get(META_IMAGE_WIDTH) is None or metadata.get(META_IMAGE_HEIGHT) is None):
        problems.append("the key file does not record its image size")
    problems += _fingerprint_problems(metadata, "it", model, clip)
    if image_size is not None and META_IMAGE_WIDTH in metadata and META_IMAGE_HEIGHT in metadata:
        w, h = int(metadata[META_IMAGE_WIDTH]), int(metadata[META_IMAGE_HEIGHT])
        if (w, h) != (int(image_size[0]), int(image_size[1])):
            problems.append(f"it was made for {w}x{h} images (width x height), not "
                            f"{int(image_size[0])}x{int(image_size[1])}: set the working resolution to match")
    if steps is not None and metadata.get(META_STEPS) is not None and int(metadata[META_STEPS]) != int(steps):
        problems.append(f"it was made with {metadata[META_STEPS]} sampling steps, not {int(steps)}: set steps to "
                        f"{metadata[META_STEPS]} (recovery must use the same count)")
    _refuse(problems)


def check_key_e(key_e_provenance: dict | None, *, model=None, clip=None) -> None:
    """Refuse a Key-E learnt with another diffusion model or encoded with another text encoder than those given."""
    _refuse(_fingerprint_problems(key_e_provenance or {}, "Key-E", model, clip))


def check_keys(key_i, key_e_provenance: dict | None, *, model=None, clip=None, steps: int | None = None) -> dict:
    """Check a Key-I LATENT and a Key-E (its provenance, or None when unknown) against each other and against
    the MODEL / CLIP / step count they are used with; return the Key-I's provenance.

    Refused: a LATENT that records no provenance (not from Make Key-I or Load Key); another step count; another
    diffusion model or text encoder than recorded; a Key-I whose latent size is not the image size it records
    (resized after it was made); a Key-E from another text encoder than the one Key-I was made under.
    """
    info = key_i_info(key_i)
    if info is None:
        raise ValueError("key_i records no step count, model or text encoder, so it is not a Key-I: connect the "
                         "key_i output of Make Key-I or Load Key (a LATENT from any other node cannot be checked)")
    problems = []
    made_with = info.get(META_STEPS)
    if steps is not None and made_with is None:
        problems.append("Key-I does not record its step count (a damaged key file?)")
    elif steps is not None and int(made_with) != int(steps):
        problems.append(f"Key-I was made with {made_with} DDIM steps, not {int(steps)}: set steps to {made_with} "
                        "(connect Load Key's steps output; with another count recovery starts from the wrong noise "
                        "level)")
    problems += _fingerprint_problems(info, "Key-I", model, clip)
    samples = key_i.get("samples")
    size = (int(samples.shape[-1]) * LATENT_SCALE, int(samples.shape[-2]) * LATENT_SCALE)
    check_working_size(*size, "Key-I", "a key this large is not one these nodes make; connect the Key-I of Make Key-I "
                       "or Load Key unchanged")
    recorded = (info.get(META_IMAGE_WIDTH), info.get(META_IMAGE_HEIGHT))
    if None not in recorded and tuple(int(v) for v in recorded) != size:
        problems.append(f"Key-I was made for {recorded[0]}x{recorded[1]} images but holds a latent of a "
                        f"{size[0]}x{size[1]} image (it was resized or replaced after it was made): connect Key-I "
                        "unchanged")
    key_e_provenance = key_e_provenance or {}
    problems += _fingerprint_problems(key_e_provenance, "Key-E", model, clip)
    key_i_clip, key_e_clip = info.get(META_CLIP_FINGERPRINT), key_e_provenance.get(META_CLIP_FINGERPRINT)
    if comparable(key_i_clip, key_e_clip) and key_i_clip != key_e_clip:
        problems.append(f"Key-E comes from another text encoder than the Key-E Key-I was made under (Key-I: "
                        f"{key_i_clip}, Key-E: {key_e_clip}): use the Key-E of the same key file, or encode it with "
                        "the text encoder the keys were made with")
    key_i_model, key_e_model = info.get(META_MODEL_FINGERPRINT), key_e_provenance.get(META_MODEL_FINGERPRINT)
    if model is None and comparable(key_i_model, key_e_model) and key_i_model != key_e_model:
        problems.append(f"Key-E was learnt with another diffusion model than Key-I was made with (Key-I: "
                        f"{key_i_model}, Key-E: {key_e_model}): use the Key-E the keys were made with")
    _refuse(problems)
    return info
