"""Stage II of Diff-Privacy: identity-guided DDIM for anonymization and visual identity hiding.

- DiffPrivacyDDIMSigmas: the reference's DDIM grid for S steps at strength S_ns (SIGMAS).
- DiffPrivacyGuidedDDIMSampler: the identity-guided DDIM as a native SAMPLER for SamplerCustom.
- DiffPrivacyAnonymize / DiffPrivacyHide: the paper's tasks in one node each, with its defaults;
  they also output their parts (SAMPLER, SIGMAS, scheduled CONDITIONING) for rewiring.
- DiffPrivacyTextKeyE: ten stage conditionings from text (nothing learnt), a stand-in for Key-E
  that the key file nodes accept like a learnt one.
"""
from __future__ import annotations

import torch

from ..guidance.energy import anonymize_energy, hide_energy
from ..guidance.guided_ddim import IdentityGuidance, guided_ddim_sampler, stage_guidance_scale
from ..guidance.schedule import scheduled_conditioning, split_stage_conditioning
from ..guidance.vae_decode import make_vae_decoder
from ..inversion.ddim import ddim_sigmas
from ..inversion.train_key_e import resize_for_training
from .schedule_nodes import encode_text, stage_texts

CATEGORY = "Diff-Privacy"
GRADIENT_MODES = ("predicted x0 (fast)", "through UNet")
RESOLUTION_TIP = ("Working resolution: the image is squashed to resolution x resolution exactly as Learn Key-E "
                  "prepares it (bicubic, antialiased; SD 1.5 and the reference work at 512). {what} 0 keeps the "
                  "image's own size, cropped to a multiple of 8. Protection and Make Key-I must use the same value "
                  "for recovery to match.")


def _tip(text, **kw):
    return dict(kw, tooltip=text)


def _model_sampling(model):
    return model.get_model_object("model_sampling")


def crop_to_latent_grid(image: torch.Tensor, vae) -> torch.Tensor:
    """Centre-crop an IMAGE to a multiple of the VAE's downscale, exactly as VAE.encode does,
    so that face landmarks found on the crop line up with the decoded predictions."""
    ratio = getattr(vae, "downscale_ratio", 8)
    ratio = ratio if isinstance(ratio, int) else 8
    for dim in (1, 2):
        size = image.shape[dim]
        keep = (size // ratio) * ratio
        if keep == 0:
            raise ValueError(f"the image ({image.shape[1]}x{image.shape[2]}) is smaller than one latent cell")
        image = image.narrow(dim, (size % ratio) // 2, keep)
    return image


def single_image(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"Diff-Privacy protects one image at a time (its Key-E belongs to one image); got a batch of "
                         f"{image.shape[0] if image.dim() == 4 else '?'} images. Split the batch and run each image "
                         "with its own Key-E.")
    return image[..., :3]


def resolution_input(what: str):
    return ("INT", _tip(RESOLUTION_TIP.format(what=what), default=512, min=0, max=4096, step=8))


def working_image(image: torch.Tensor, vae, resolution: int) -> torch.Tensor:
    """The one image protection, guidance and Key-I work on, resized as Key-E learning resizes it."""
    resolution = int(resolution)
    if resolution and (resolution < 64 or resolution % 8):
        raise ValueError(f"resolution must be 0 (keep the image's size) or a multiple of 8 of at least 64, "
                         f"got {resolution}")
    return crop_to_latent_grid(resize_for_training(single_image(image), resolution), vae)


def build_guidance(model, vae, face_model, image, energy, gradient_chunk: int = 0,
                   redetect_every: int = 0) -> IdentityGuidance:
    """Identity guidance with the face of ``image`` (a working image, see :func:`working_image`) as reference."""
    return IdentityGuidance.from_image(face_model, make_vae_decoder(vae, model), image[0], energy,
                                       chunk=gradient_chunk, redetect_every=redetect_every)


def stage_conditionings(key_e):
    """C^0..C^9 from Key-E (ten entries or a batch of ten), or ten copies of one plain conditioning:
    a text prompt standing in for Key-E (nothing learnt; recovery is then only approximate)."""
    if len(key_e) == 1 and key_e[0][0].shape[0] == 1:
        return [[key_e[0][0], dict(key_e[0][1])] for _ in range(10)]
    return split_stage_conditioning(key_e)


def task_schedule(key_e, uncond, tau):
    if len(uncond) != 1:
        raise ValueError(f"uncond must be one conditioning (UC, the empty prompt), got {len(uncond)} entries")
    return scheduled_conditioning(stage_conditionings(key_e), uncond[0], tau)


def run_guided_task(model, vae, image, sampler, sigmas, schedule, seed, num_outputs):
    """Noise the working image's latent num_outputs times to sigmas[0] (seeded) and denoise with ``sampler``."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    latent = vae.encode(image)
    batch = latent.repeat(num_outputs, 1, 1, 1)
    noise = comfy.sample.prepare_noise(batch, seed)  # one independent noising per output (paper: 4)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, schedule, schedule, batch,
                                         callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                         seed=seed)
    return vae.decode(samples), {"samples": samples}


REDETECT_TIP = ("Every k guided steps, find the face again on each predicted image (largest face) and align with "
                "those landmarks until the next search; a prediction with no face found keeps its previous ones. "
                "0: always the original's landmarks. Default {default}.")


class DiffPrivacyDDIMSigmas:
    DESCRIPTION = ("The reference's DDIM timesteps {1, 1+k, ...} (k = 1000 // steps) on the model's own noise "
                   "schedule. strength S_ns keeps the lowest int(S_ns*steps) of them: sigmas[0] is where the "
                   "original latent is noised to. strength 1.0 gives the full grid for Key-I and recovery.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", _tip("The diffusion model (SD 1.x): its noise schedule gives the sigmas.")),
            "steps": ("INT", _tip("S, DDIM steps over the whole schedule (paper: 50 anonymize, 100 hide).",
                                  default=50, min=1, max=1000)),
            "strength": ("FLOAT", _tip("S_ns, the noise strength: the fraction of the steps actually run "
                                       "(paper: 0.6 anonymize, 0.8 hide; 1.0 for Key-I/recovery).",
                                       default=1.0, min=0.01, max=1.0, step=0.01)),
        }}

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("Descending sigmas ending at 0, for SamplerCustom.",)
    FUNCTION = "sigmas"
    CATEGORY = CATEGORY + "/sampling"

    def sigmas(self, model, steps, strength):
        return (ddim_sigmas(_model_sampling(model), steps, strength),)


class DiffPrivacyGuidedDDIMSampler:
    DESCRIPTION = ("Identity-guided deterministic DDIM (paper Eq. 12) as a SAMPLER: every step decodes the "
                   "predicted clean latent, embeds the face with face_model and moves the next latent against "
                   "the energy's gradient. Use with SamplerCustom at cfg 1.0 and DiffPrivacyDDIMSigmas.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", _tip("The diffusion model the sampler will run (for its noise schedule).")),
            "vae": ("VAE", _tip("Decodes the predicted clean latent for the face recognizer.")),
            "face_model": ("FACE_MODEL", _tip("A differentiable face recognizer with a detector (FaceNet, ArcFace).")),
            "image": ("IMAGE", _tip("The original image (one): its face is the identity reference.")),
            "task": (("anonymize", "hide"), _tip("anonymize: L_Idis + L_div (away from the original, outputs apart); "
                                                 "hide: L_is (stay recognisable to machines).")),
            "tau": ("FLOAT", _tip("Where the schedule switches to UC (t <= tau*T); lambda_above applies above it.",
                                  default=0.4, min=0.0, max=1.0, step=0.01)),
            "lambda_above": ("FLOAT", _tip("Guidance scale on steps with t > tau*T (Key-E stages). Paper: 1 "
                                           "anonymize, 1.5 hide.", default=1.0, min=0.0, max=100.0, step=0.05)),
            "lambda_below": ("FLOAT", _tip("Guidance scale on steps with t <= tau*T (UC). Paper: 1 anonymize, "
                                           "2.5 hide.", default=1.0, min=0.0, max=100.0, step=0.05)),
            "diversity_weight": ("FLOAT", _tip("Weight of L_div against L_Idis (anonymize only).",
                                               default=1.0, min=0.0, max=100.0, step=0.05)),
            "gradient": (GRADIENT_MODES, _tip("Gradient with respect to the predicted clean latent (the reference, "
                                              "fast) or through the UNet (paper Eq. 9, slower, more memory).")),
            "redetect_every": ("INT", _tip(REDETECT_TIP.format(default="0 (anonymize keeps the layout)"),
                                           default=0, min=0, max=1000)),
            "resolution": resolution_input("The reference face is found at this size; its landmarks are rescaled to "
                                           "the sampled latent's size (VAE-encode the image at the same size)."),
        }}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "sampler"
    CATEGORY = CATEGORY + "/sampling"

    def sampler(self, model, vae, face_model, image, task, tau, lambda_above, lambda_below, diversity_weight,
                gradient, redetect_every=0, resolution=512):
        energy = anonymize_energy(1.0, diversity_weight) if task == "anonymize" else hide_energy()
        guidance = build_guidance(model, vae, face_model, working_image(image, vae, resolution), energy,
                                  redetect_every=redetect_every)
        scale = stage_guidance_scale(_model_sampling(model), tau, lambda_above, lambda_below)
        return (guided_ddim_sampler(guidance, scale, through_unet=gradient == GRADIENT_MODES[1]),)


def _task_inputs(steps, strength, tau, outputs):
    return {
        "model": ("MODEL", _tip("Your SD 1.5 model (the one Key-E was learned with).")),
        "vae": ("VAE", _tip("The model's VAE: encodes the original, decodes predictions for the recognizer.")),
        "face_model": ("FACE_MODEL", _tip("A differentiable face recognizer with a detector (FaceNet, ArcFace).")),
        "image": ("IMAGE", _tip("The original image, a batch of one. Guidance steers the largest face "
                                     "away from (anonymize) or towards (hide) its identity; other faces in a group "
                                     "photo are re-generated by the diffusion but not steered, so crop group photos "
                                     "to one face per run for full protection.")),
        "key_e": ("CONDITIONING", _tip("Key-E: the ten stage conditionings C^0..C^9 of this image, or one text "
                                       "conditioning used for every stage (nothing learnt).")),
        "uncond": ("CONDITIONING", _tip("UC, the empty-prompt conditioning, used where t <= tau*T.")),
        "seed": ("INT", _tip("Seed of the noising (one noise per output).", default=0, min=0,
                             max=0xffffffffffffffff, control_after_generate=True)),
        "steps": ("INT", _tip(f"S, DDIM steps over the whole schedule (paper: {steps}).", default=steps,
                              min=1, max=1000)),
        "strength": ("FLOAT", _tip(f"S_ns, noise strength: int(S_ns*S) steps are run (paper: {strength}).",
                                   default=strength, min=0.01, max=1.0, step=0.01)),
        "tau": ("FLOAT", _tip(f"UC where t <= tau*T, Key-E stage C^(t//100) above (paper: {tau}).",
                              default=tau, min=0.0, max=1.0, step=0.01)),
        "num_outputs": ("INT", _tip("Independent noisings of the original, denoised together "
                                    f"(paper: {outputs}).", default=outputs, min=1, max=16)),
        "resolution": resolution_input("The output images and latents come out at this size."),
    }


_PARTS = ("SAMPLER", "SIGMAS", "CONDITIONING")
_PARTS_TIPS = ("The guided DDIM sampler built here (for SamplerCustom).",
               "The DDIM sigmas for steps/strength (sigmas[0] = the noise level).",
               "The scheduled Key-E/UC conditioning (positive; cfg 1.0).")


class DiffPrivacyAnonymize:
    DESCRIPTION = ("Diff-Privacy anonymization (paper Sec. 2.3.3): num_outputs noisings of the original, denoised "
                   "with Key-E above tau and UC below, guided by L_Idis + L_div so every output has a different "
                   "identity from the original and from each other. Defaults are the paper's.")

    @classmethod
    def INPUT_TYPES(cls):
        req = _task_inputs(50, 0.6, 0.4, 4)
        req["guidance_scale"] = ("FLOAT", _tip("lambda, the identity guidance scale (paper: 1).",
                                               default=1.0, min=0.0, max=100.0, step=0.05))
        req["diversity_weight"] = ("FLOAT", _tip("Weight of L_div (outputs apart) against L_Idis (paper: 1).",
                                                 default=1.0, min=0.0, max=100.0, step=0.05))
        return {"required": req}

    RETURN_TYPES = ("IMAGE", "LATENT") + _PARTS
    RETURN_NAMES = ("images", "latents", "sampler", "sigmas", "schedule")
    OUTPUT_TOOLTIPS = ("The anonymized images.", "Their latents.") + _PARTS_TIPS
    FUNCTION = "anonymize"
    CATEGORY = CATEGORY

    def anonymize(self, model, vae, face_model, image, key_e, uncond, seed, steps, strength, tau, num_outputs,
                  guidance_scale, diversity_weight, resolution=512):
        image = working_image(image, vae, resolution)
        guidance = build_guidance(model, vae, face_model, image, anonymize_energy(1.0, diversity_weight))
        sampler = guided_ddim_sampler(guidance, float(guidance_scale))
        sigmas = ddim_sigmas(_model_sampling(model), steps, strength)
        schedule = task_schedule(key_e, uncond, tau)
        images, latents = run_guided_task(model, vae, image, sampler, sigmas, schedule, seed, num_outputs)
        return images, latents, sampler, sigmas, schedule


class DiffPrivacyHide:
    DESCRIPTION = ("Diff-Privacy visual identity hiding (paper Sec. 2.3.4): a strong noising of the original, "
                   "denoised with Key-E above tau and UC below, guided by L_is so that face recognizers still "
                   "recognise the person while people do not. Defaults are the reference code's.")

    @classmethod
    def INPUT_TYPES(cls):
        req = _task_inputs(100, 0.8, 0.6, 1)
        req["lambda_above"] = ("FLOAT", _tip("Guidance scale where t > tau*T (reference: 1.5).",
                                             default=1.5, min=0.0, max=100.0, step=0.05))
        req["lambda_below"] = ("FLOAT", _tip("Guidance scale where t <= tau*T (reference: 2.5).",
                                             default=2.5, min=0.0, max=100.0, step=0.05))
        req["redetect_every"] = ("INT", _tip(REDETECT_TIP.format(
            default="10: hiding noises to 0.8 T, so the face can move from the original's place; 7 detections "
                    "per output over the 80 steps run, little next to the UNet"),
            default=10, min=0, max=1000))
        return {"required": req}

    RETURN_TYPES = ("IMAGE", "LATENT") + _PARTS
    RETURN_NAMES = ("images", "latents", "sampler", "sigmas", "schedule")
    OUTPUT_TOOLTIPS = ("The identity-hidden images.", "Their latents.") + _PARTS_TIPS
    FUNCTION = "hide"
    CATEGORY = CATEGORY

    def hide(self, model, vae, face_model, image, key_e, uncond, seed, steps, strength, tau, num_outputs,
             lambda_above, lambda_below, redetect_every=10, resolution=512):
        image = working_image(image, vae, resolution)
        guidance = build_guidance(model, vae, face_model, image, hide_energy(), redetect_every=redetect_every)
        scale = stage_guidance_scale(_model_sampling(model), tau, lambda_above, lambda_below)
        sampler = guided_ddim_sampler(guidance, scale)
        sigmas = ddim_sigmas(_model_sampling(model), steps, strength)
        schedule = task_schedule(key_e, uncond, tau)
        images, latents = run_guided_task(model, vae, image, sampler, sigmas, schedule, seed, num_outputs)
        return images, latents, sampler, sigmas, schedule


class DiffPrivacyTextKeyE:
    DESCRIPTION = ("A Key-E made of text, with nothing learnt: the ten stage conditionings C^0..C^9 encoded from "
                   "one prompt (used for every stage) or ten lines (C^0 first). Protection and recovery run as with "
                   "a learnt Key-E, but anyone who guesses the prompt holds this half of the key, and the protected "
                   "image keeps less of the original's look. Also outputs UC, the empty prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", _tip("The text encoder of your SD 1.5 checkpoint.")),
            "stage_text": ("STRING", _tip("One line for all ten stages, or ten lines for C^0 (t 0-99) ... C^9 "
                                          "(t 900-999).", multiline=True, default="a photo of a person")),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("key_e", "uncond")
    OUTPUT_TOOLTIPS = ("Key-E: one conditioning entry with a batch of ten stages, like Learn / Load Key-E output.",
                       "UC, the empty-prompt conditioning.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY + "/keys"

    def encode(self, clip, stage_text):
        encoded: dict[str, list] = {}
        stages = [encoded.setdefault(t, encode_text(clip, t)) for t in stage_texts(stage_text)]
        shapes = {tuple(s[0].shape) for s in stages}
        if len(shapes) != 1:
            raise ValueError(f"the stage prompts encode to different shapes {sorted(shapes)} (a prompt longer than "
                             "75 tokens takes more than one chunk): shorten the long ones")
        extra = {}
        pooled = [s[1].get("pooled_output") for s in stages]
        if all(isinstance(p, torch.Tensor) for p in pooled):
            extra["pooled_output"] = torch.cat([p.reshape(1, -1) for p in pooled])
        return [[torch.cat([s[0] for s in stages]), extra]], [encode_text(clip, "")]


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyTextKeyE": DiffPrivacyTextKeyE,
    "DiffPrivacyDDIMSigmas": DiffPrivacyDDIMSigmas,
    "DiffPrivacyGuidedDDIMSampler": DiffPrivacyGuidedDDIMSampler,
    "DiffPrivacyAnonymize": DiffPrivacyAnonymize,
    "DiffPrivacyHide": DiffPrivacyHide,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyTextKeyE": "Diff-Privacy Text Key-E (nothing learnt)",
    "DiffPrivacyDDIMSigmas": "Diff-Privacy DDIM Sigmas",
    "DiffPrivacyGuidedDDIMSampler": "Diff-Privacy Guided DDIM Sampler",
    "DiffPrivacyAnonymize": "Diff-Privacy Anonymize",
    "DiffPrivacyHide": "Diff-Privacy Hide Identity",
}
