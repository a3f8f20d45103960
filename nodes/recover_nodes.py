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

import torch

from ..guidance.working_image import working_image
from ..inversion.ddim import make_key_i, recover
from ..inversion.key_e import KeyE
from .common import resolution_input, rgb_batch

CATEGORY = "Diff-Privacy/keys"


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
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("key_i",)
    OUTPUT_TOOLTIPS = ("Key-I, the inverted noisy latent (save it with DiffPrivacySaveKey).",)
    FUNCTION = "make_key_i"
    CATEGORY = CATEGORY

    def make_key_i(self, model, key_e, vae, image, steps, resolution=512):
        images = rgb_batch(image)
        key_es = KeyE.for_batch(key_e, images.shape[0])  # a batch: each image with its own Key-E
        keys = [make_key_i(model, k, vae.encode(working_image(images[i:i + 1], vae, resolution)),
                           steps) for i, k in enumerate(key_es)]
        return ({**keys[0], "samples": torch.cat([k["samples"] for k in keys])},)


class DiffPrivacyRecover:
    DESCRIPTION = ("Identity recovery (paper Sec. 2.4): deterministic DDIM from Key-I with Key-E's stage "
                   "conditionings. Needs only the keys, never the protected image. Refuses keys made with another "
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
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("recovered",)
    OUTPUT_TOOLTIPS = ("The recovered latent: VAE Decode it.",)
    FUNCTION = "recover"
    CATEGORY = CATEGORY

    def recover(self, model, key_e, key_i, steps):
        return (recover(model, KeyE.from_conditioning(key_e), key_i, steps),)


NODE_CLASS_MAPPINGS = {"DiffPrivacyMakeKeyI": DiffPrivacyMakeKeyI, "DiffPrivacyRecover": DiffPrivacyRecover}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyMakeKeyI": "Diff-Privacy Make Key-I",
                              "DiffPrivacyRecover": "Diff-Privacy Recover"}
