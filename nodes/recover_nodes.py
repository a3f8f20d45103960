"""Key-I and identity recovery (paper Sec. 2.4, Alg. 1 lines 9-11).

- DiffPrivacyMakeKeyI: DDIM inversion of the ORIGINAL image's latent under Key-E (C^{t//100} at every
  step), as the reference does; Key-I does not depend on the protected image. The image is resized to the
  working resolution exactly as the protection nodes resize it (``encrypt_nodes.working_image``).
- DiffPrivacyRecover: DDIM from Key-I under Key-E. Needs only the two keys and the step count.

Key-I is a LATENT in ComfyUI's "latent with leftover noise" convention (what KSamplerAdvanced
returns mid-way): samples = process_out(x_T) with x_T = z_T * sqrt(1 + sigma_T^2) at the first
sigma of DiffPrivacyDDIMSigmas(steps, strength 1.0). So SamplerCustom (add_noise off, cfg 1.0,
positive = Key-E schedule with tau 0, those sigmas, any DDIM/euler sampler) also recovers it.
The reference's z_T (``<name>_zt.pt``) is ``inversion.ddim.key_i_to_vp`` of the scaled latent.
"""
from __future__ import annotations

import torch

from ..guidance.schedule import scheduled_conditioning
from ..inversion.ddim import ddim_invert, ddim_sigmas, sample_ddim
from .encrypt_nodes import resolution_input, stage_conditionings, working_image

CATEGORY = "Diff-Privacy/keys"
KEY_I_INFO = "diffprivacy_key_i"  # LATENT entry: {"steps", "sigma"} of the grid Key-I lies on


def key_e_schedule(key_e):
    """C^{t//100} at every timestep (tau = 0; t = 0, reached only with 1000 steps, also gets C^0)."""
    stages = stage_conditionings(key_e)
    return scheduled_conditioning(stages, stages[0], 0.0)


def run_ddim(model, key_e, latent_samples, sigmas, sampler_fn):
    """Run a k-diffusion DDIM function over ``sigmas`` through ComfyUI's sampling (cfg 1, no noise)."""
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    schedule = key_e_schedule(key_e)
    noise = torch.zeros_like(latent_samples)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    return comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.KSAMPLER(sampler_fn), sigmas, schedule,
                                      schedule, latent_samples, callback=callback,
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)


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
            "key_e": ("CONDITIONING", {"tooltip": "Key-E: the ten stage conditionings C^0..C^9 (or one text conditioning)."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: encodes the original image."}),
            "image": ("IMAGE", {"tooltip": "The ORIGINAL (unprotected) image, one, as given to the protection node."}),
            "steps": ("INT", _steps_tip("recovery must use the same number")),
            "resolution": resolution_input("Key-I, and so the recovered image, come out at this size."),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("key_i",)
    OUTPUT_TOOLTIPS = ("Key-I, the inverted noisy latent (save it with DiffPrivacySaveKey).",)
    FUNCTION = "make_key_i"
    CATEGORY = CATEGORY

    def make_key_i(self, model, key_e, vae, image, steps, resolution=512):
        samples = vae.encode(working_image(image, vae, resolution))
        sigmas = ddim_sigmas(model.get_model_object("model_sampling"), steps, 1.0)
        key_i = run_ddim(model, key_e, samples, sigmas, ddim_invert)
        return ({"samples": key_i, KEY_I_INFO: {"steps": int(steps), "sigma": float(sigmas[0])}},)


class DiffPrivacyRecover:
    DESCRIPTION = ("Identity recovery (paper Sec. 2.4): deterministic DDIM from Key-I with Key-E's stage "
                   "conditionings. Needs only the keys, never the protected image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD 1.5 model the keys were made with."}),
            "key_e": ("CONDITIONING", {"tooltip": "Key-E: the ten stage conditionings C^0..C^9 (or one text conditioning)."}),
            "key_i": ("LATENT", {"tooltip": "Key-I, from DiffPrivacyMakeKeyI or DiffPrivacyLoadKey."}),
            "steps": ("INT", _steps_tip("must equal the steps Key-I was made with")),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("recovered",)
    OUTPUT_TOOLTIPS = ("The recovered latent: VAE Decode it.",)
    FUNCTION = "recover"
    CATEGORY = CATEGORY

    def recover(self, model, key_e, key_i, steps):
        info = key_i.get(KEY_I_INFO)
        if info is not None and int(info["steps"]) != int(steps):
            raise ValueError(f"this Key-I was made with {info['steps']} DDIM steps; set steps to {info['steps']} "
                             f"(recovery with {steps} steps starts from the wrong noise level)")
        sigmas = ddim_sigmas(model.get_model_object("model_sampling"), steps, 1.0)
        return ({"samples": run_ddim(model, key_e, key_i["samples"], sigmas, sample_ddim)},)


NODE_CLASS_MAPPINGS = {"DiffPrivacyMakeKeyI": DiffPrivacyMakeKeyI, "DiffPrivacyRecover": DiffPrivacyRecover}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyMakeKeyI": "Diff-Privacy Make Key-I",
                              "DiffPrivacyRecover": "Diff-Privacy Recover"}
