"""Key-I and identity recovery (paper Sec. 2.4, Alg. 1 lines 9-11).

- DiffPrivacyMakeKeyI: DDIM inversion of the ORIGINAL image's latent under Key-E (C^{t//100} at every
  step), as the reference does; Key-I does not depend on the protected image. The image is resized to the
  working resolution exactly as the protection nodes resize it (``guidance.working_image``).
- DiffPrivacyRecover: DDIM from Key-I under Key-E. Needs only the two keys and the step count. Whatever node the
  keys come from, it refuses a Key-I made with another step count, diffusion model or image size, or under a
  Key-E of another text encoder (each key carries where it came from: ``inversion.key_check``).

Key-I is a LATENT in ComfyUI's "latent with leftover noise" convention (what KSamplerAdvanced
returns mid-way): samples = process_out(x_T) with x_T = z_T * sqrt(1 + sigma_T^2) at the first
sigma of DiffPrivacyDDIMSigmas(steps, strength 1.0). So SamplerCustom (add_noise off, cfg 1.0,
positive = Key-E schedule with tau 0, those sigmas, any DDIM/euler sampler) also recovers it.
The reference's z_T (``<name>_zt.pt``) is ``inversion.ddim.key_i_to_vp`` of the scaled latent.
"""
from __future__ import annotations

import logging

import torch

from ..guidance.working_image import working_image
from ..inversion.ddim import make_key_i, recover
from ..inversion.key_bundle import KEY_I_CROPS, crop_plans
from ..inversion.key_e import KeyE
from ..methods.pipeline import Plan, paste_recovered
from .common import resolution_input, rgb_batch

CATEGORY = "Diff-Privacy/keys"
log = logging.getLogger("diffprivacy")


def _steps_tip(what):
    return {"default": 50, "min": 1, "max": 1000,
            "tooltip": f"S, DDIM steps over the whole schedule; {what} (paper: 50 for anonymization keys, "
                       "100 for hiding keys)."}


class DiffPrivacyMakeKeyI:
    DESCRIPTION = ("Key-I: DDIM inversion (paper Eq. 4) of the original image's latent under Key-E, over the "
                   "full DDIM grid of `steps`, at the protection's working resolution. Keep it secret with Key-E: "
                   "together they recover the original.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD 1.5 model Key-E belongs to."}),
            "key_e": ("CONDITIONING", {"tooltip": "Key-E: the ten stage conditionings C^0..C^9 (or one text "
                                                  "conditioning); for a batch, one Key-E per image in batch order."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: encodes the original image."}),
            "image": ("IMAGE", {"tooltip": "The ORIGINAL (unprotected) images, as protected (wire the protection "
                                           "node's 'originals' output here); one Key-I per image."}),
            "steps": ("INT", _steps_tip("recovery must use the same number")),
            "resolution": resolution_input("Key-I, and so the recovered image, come out at this size."),
        }, "optional": {
            "crops": ("FACE_CROPS", {"tooltip": "Where the protection node cut the photo (its 'crops' output). "
                                                "Connected, Key-I is made of each face crop (image: the protection "
                                                "node's 'originals', or the original photo, cut here the same way) "
                                                "and records the crops, so Recover returns the whole photo."}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("key_i",)
    OUTPUT_TOOLTIPS = ("Key-I, the inverted noisy latent (save it with DiffPrivacySaveKey).",)
    FUNCTION = "make_key_i"
    CATEGORY = CATEGORY

    def make_key_i(self, model, key_e, vae, image, steps, resolution=512, crops=None):
        images = rgb_batch(image)
        if crops is not None:
            images = crop_images(images, crops)
        key_es = KeyE.for_batch(key_e, images.shape[0])  # a batch: each image (crop) with its own Key-E
        keys = [make_key_i(model, k, vae.encode(images[i:i + 1] if crops is not None else
                                                working_image(images[i:i + 1], vae, resolution)),
                           steps) for i, k in enumerate(key_es)]
        out = {**keys[0], "samples": torch.cat([k["samples"] for k in keys])}
        if crops is not None:
            out[KEY_I_CROPS] = [plan.as_dict() for plan in crops]
        return (out,)


def crop_images(images, plans) -> "torch.Tensor":
    """The working images of the face crops of ``plans`` (one Plan per photo): ``images`` is either those crops
    (a protection node's 'originals') or the photos themselves, cut here as the protection node cut them."""
    if not isinstance(plans, (list, tuple)) or not plans or not all(isinstance(p, Plan) for p in plans):
        raise ValueError("crops must be a protection node's 'crops' output (FACE_CROPS)")
    total, sizes = sum(len(p.crops) for p in plans), {p.resolution for p in plans}
    if images.shape[0] == len(plans) and all(tuple(img.shape[:2]) == (p.height, p.width)
                                              for img, p in zip(images, plans)):
        return torch.cat([crop for img, p in zip(images, plans) for crop in p.cut(img)])
    if images.shape[0] == total and len(sizes) == 1 and images.shape[1] == images.shape[2] == sizes.pop():
        return images
    raise ValueError(f"image holds {images.shape[0]} image(s) of {images.shape[2]}x{images.shape[1]}, but crops "
                     f"describes {len(plans)} photo(s) ({', '.join(f'{p.width}x{p.height}' for p in plans)}) with "
                     f"{total} face crop(s): wire the protection node's 'originals' (the crops) or the original "
                     "photo(s) it protected")


class DiffPrivacyRecover:
    DESCRIPTION = ("Identity recovery (paper Sec. 2.4): deterministic DDIM from Key-I with Key-E's stage "
                   "conditionings, one per face crop, pasted back into the protected photo where the key says they "
                   "were cut (the key holds nothing of the photo outside the faces). Refuses keys made with another "
                   "step count, model, text encoder or image size, and says what to set.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD 1.5 model the keys were made with (checked against the "
                                           "fingerprint Key-I records)."}),
            "key_e": ("CONDITIONING", {"tooltip": "Key-E: the ten stage conditionings C^0..C^9 (or one text "
                                                  "conditioning). One from these nodes records its text encoder, "
                                                  "checked against Key-I's; one from stock nodes is not checked."}),
            "key_i": ("LATENT", {"tooltip": "Key-I, from DiffPrivacyMakeKeyI or DiffPrivacyLoadKey (it records its "
                                            "step count, model, text encoder and image size; other LATENTs are "
                                            "refused)."}),
            "steps": ("INT", _steps_tip("must equal the steps Key-I was made with")),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "The model's VAE: decodes the recovered crops for the 'photo' output."}),
            "protected": ("IMAGE", {"tooltip": "The protected photo (one): a key made of face crops records where "
                                               "they were cut, and the recovered faces are pasted back into this "
                                               "photo at its size (the key holds nothing of the photo outside the "
                                               "faces). Not needed for a whole-frame key."}),
        }}

    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("recovered", "photo")
    OUTPUT_TOOLTIPS = ("The recovered latent(s): one per face crop for a face-crop key (VAE Decode gives the crops).",
                       "The recovered photo at its own size: the faces recovered and pasted into the protected photo "
                       "(needs vae and protected); for a whole-frame key, the recovered image decoded (needs vae). "
                       "Without vae: an empty 64x64 image (the LATENT is the result).")
    FUNCTION = "recover"
    CATEGORY = CATEGORY

    def recover(self, model, key_e, key_i, steps, vae=None, protected=None):
        latent = recover(model, KeyE.from_conditioning(key_e), key_i, steps)
        return latent, recovered_photo(latent, crop_plans(key_i), vae, protected)


def recovered_photo(latent: dict, plans, vae, protected):
    """The recovered crops pasted into the protected photo (a face-crop key), or the decoded image (whole frame);
    an empty 1x64x64 image when vae is not connected (the LATENT output is then the result)."""
    if vae is None:  # the LATENT is the result (e.g. compared by Key Security); the photo output says nothing
        log.info("[Diff-Privacy] Recover: vae not connected, so no recovered photo (the 'recovered' LATENT holds %s)",
                 "the face crops" if plans else "the recovered image")
        return torch.zeros(1, 64, 64, 3)
    decoded = vae.decode(latent["samples"])
    if not plans:
        return decoded.reshape(-1, *decoded.shape[-3:])
    if len(plans) != 1:
        raise ValueError(f"this Key-I holds the crops of {len(plans)} photos: recover one key file (one photo) at a "
                         "time")
    return paste_recovered(plans[0], None if protected is None else rgb_batch(protected, "protected"), decoded)


NODE_CLASS_MAPPINGS = {"DiffPrivacyMakeKeyI": DiffPrivacyMakeKeyI, "DiffPrivacyRecover": DiffPrivacyRecover}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyMakeKeyI": "Diff-Privacy Make Key-I",
                              "DiffPrivacyRecover": "Diff-Privacy Recover"}
