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

from ..methods import diff_privacy
from ..guidance.ddim import ddim_sigmas
from ..methods.diff_privacy import FaceChoice, model_sampling
from ..guidance.face.base import SELECT_MODES
from ..guidance.gradient_path import DECODER_CHOICES, PRECISION_CHOICES, GradientOptions
from ..guidance.working_image import working_image, working_mask
from ..inversion.key_e import KeyE, encode_text
from ..methods import contract
from ..methods.pipeline import PipelineOptions
from ..methods.receipt import receipt_text
from .common import CATEGORY, pipeline_input, receipt_outputs, resolution_input, rgb_batch, tip

GRADIENT_MODES = ("predicted x0 (fast)", "through UNet")


_GRADIENT_INPUTS = {
    "gradient_decoder": (DECODER_CHOICES, tip(
        "What the guidance gradient decodes the predicted image with. full VAE: the model's own (exact, slowest). "
        "tiny: ComfyUI's preview decoder from models/vae_approx (taesd_decoder for SD 1.x; about 8x cheaper, an "
        "approximation of the VAE). auto: tiny when its file is there, else the full VAE (the log says which ran).",
        default="full VAE")),
    "face_window": ("BOOLEAN", tip(
        "Decode only the latent window around the chosen faces (what the recognizer sees, plus a margin of 48 "
        "pixels) for the gradient, instead of the whole frame: a portrait needs 2-4x fewer pixels.", default=False)),
    "gradient_checkpointing": ("BOOLEAN", tip(
        "Recompute the decoder's blocks in the backward pass instead of keeping their activations: much less memory "
        "for about one more decoder pass.", default=False)),
    "gradient_precision": (PRECISION_CHOICES, tip(
        "auto: bf16 autocast for the decoder and recognizer on GPUs that support it, fp32 elsewhere; fp32: always "
        "full precision; bf16: ask for it (fp32 with a log line where unsupported).", default="auto")),
    "channels_last": ("BOOLEAN", tip(
        "Opt-in: channels_last memory layout for the gradient decoder and recognizer (often faster convolutions on "
        "CPU and GPU; falls back with a log line).", default=False)),
    "torch_compile": ("BOOLEAN", tip(
        "Opt-in: torch.compile the gradient decoder (the first step compiles; falls back to eager with a log line "
        "where compiling fails).", default=False)),
}


def _uncond_entry(uncond):
    if len(uncond) != 1:
        raise ValueError(f"uncond must be one conditioning (UC, the empty prompt), got {len(uncond)} entries")
    return uncond[0]


def face_inputs() -> dict:
    """The optional inputs that choose which faces guidance steers, and how its gradient is computed."""
    return {
        "faces": (SELECT_MODES, tip("Which faces guidance steers, each against its own original identity: all (a "
                                    "group photo protected in one run), the largest, the faces at face_indices, or "
                                    "the faces under face_mask. Faces not chosen are regenerated but not steered.",
                                    default="all")),
        "face_indices": ("STRING", tip("With faces = indices: comma-separated positions, 0 = the largest face "
                                       "(e.g. '0, 2').", default="")),
        "face_mask": ("MASK", tip("With faces = mask: white over the faces to steer (at the original's size).")),
        "gradient_options": ("GRADIENT_OPTIONS", tip("How the guidance gradient decodes and how much memory it takes "
                                                     "(Diff-Privacy Gradient Options); unconnected: the full VAE over "
                                                     "the whole frame, chunked to the free memory, fp32 on CPU.")),
    }


def _face_choice(faces, face_indices, face_mask, index, image) -> FaceChoice:
    return FaceChoice(faces, face_indices, working_mask(face_mask, index, image.shape[1:3]))


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
            "model": ("MODEL", tip("The diffusion model (SD 1.x): its noise schedule gives the sigmas.")),
            "steps": ("INT", tip("S, DDIM steps over the whole schedule (paper: 50 anonymize, 100 hide).",
                                  default=50, min=1, max=1000)),
            "strength": ("FLOAT", tip("S_ns, the noise strength: the fraction of the steps actually run "
                                       "(paper: 0.6 anonymize, 0.8 hide; 1.0 for Key-I/recovery).",
                                       default=1.0, min=0.01, max=1.0, step=0.01)),
        }}

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("Descending sigmas ending at 0, for SamplerCustom.",)
    FUNCTION = "sigmas"
    CATEGORY = CATEGORY + "/sampling"

    def sigmas(self, model, steps, strength):
        return (ddim_sigmas(model_sampling(model), steps, strength),)


class DiffPrivacyGuidedDDIMSampler:
    DESCRIPTION = ("Identity-guided deterministic DDIM (paper Eq. 12) as a SAMPLER: every step decodes the "
                   "predicted clean latent, embeds the face with face_model and moves the next latent against "
                   "the energy's gradient. Use with SamplerCustom at cfg 1.0 and DiffPrivacyDDIMSigmas.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("The diffusion model the sampler will run (for its noise schedule).")),
            "vae": ("VAE", tip("Decodes the predicted clean latent for the face recognizer.")),
            "face_model": ("FACE_MODEL", tip("A differentiable face recognizer with a detector (FaceNet, ArcFace).")),
            "image": ("IMAGE", tip("The original image (one): its face is the identity reference.")),
            "task": (("anonymize", "hide"), tip("anonymize: L_Idis + L_div (away from the original, outputs apart); "
                                                 "hide: L_is (stay recognisable to machines).")),
            "tau": ("FLOAT", tip("Where the schedule switches to UC (t <= tau*T); lambda_above applies above it.",
                                  default=0.4, min=0.0, max=1.0, step=0.01)),
            "lambda_above": ("FLOAT", tip("Guidance scale on steps with t > tau*T (Key-E stages). Paper: 1 "
                                           "anonymize, 1.5 hide.", default=1.0, min=0.0, max=100.0, step=0.05)),
            "lambda_below": ("FLOAT", tip("Guidance scale on steps with t <= tau*T (UC). Paper: 1 anonymize, "
                                           "2.5 hide.", default=1.0, min=0.0, max=100.0, step=0.05)),
            "diversity_weight": ("FLOAT", tip("Weight of L_div against L_Idis (anonymize only).",
                                               default=1.0, min=0.0, max=100.0, step=0.05)),
            "gradient": (GRADIENT_MODES, tip("Gradient with respect to the predicted clean latent (the reference, "
                                              "fast) or through the UNet (paper Eq. 9, slower, more memory).")),
            "redetect_every": ("INT", tip(REDETECT_TIP.format(default="0 (anonymize keeps the layout)"),
                                           default=0, min=0, max=1000)),
            "resolution": resolution_input("The reference faces are found at this size; their landmarks are "
                                           "rescaled to "
                                           "the sampled latent's size (VAE-encode the image at the same size)."),
        }, "optional": face_inputs()}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "sampler"
    CATEGORY = CATEGORY + "/sampling"

    def sampler(self, model, vae, face_model, image, task, tau, lambda_above, lambda_below, diversity_weight,
                gradient, redetect_every=0, resolution=512, faces="all", face_indices="", face_mask=None,
                gradient_options=None):
        image = working_image(image, vae, resolution)
        return (diff_privacy.guided_sampler(model, vae, face_model, image, task, tau, lambda_above, lambda_below,
                                            diversity_weight, through_unet=gradient == GRADIENT_MODES[1],
                                            redetect_every=redetect_every,
                                            faces=_face_choice(faces, face_indices, face_mask, 0, image),
                                            gradient=gradient_options or GradientOptions()),)


def _task_inputs(steps, strength, tau, outputs):
    return {
        "model": ("MODEL", tip("Your SD 1.5 model (the one Key-E was learned with).")),
        "vae": ("VAE", tip("The model's VAE: encodes the original, decodes predictions for the recognizer.")),
        "face_model": ("FACE_MODEL", tip("A differentiable face recognizer with a detector (FaceNet, ArcFace).")),
        "image": ("IMAGE", tip("The original images. Each image of a batch is protected on its own, with its own "
                               "Key-E; an image where no face is found is reported and left out, the others are "
                               "still protected. Guidance steers the faces chosen by 'faces' (default all).")),
        "key_e": ("CONDITIONING", tip("Key-E: the ten stage conditionings C^0..C^9 of the image (for a batch: one "
                                      "Key-E per image, combined in batch order with Conditioning Combine), or one "
                                      "text conditioning used for every stage (nothing learnt).")),
        "uncond": ("CONDITIONING", tip("UC, the empty-prompt conditioning, used where t <= tau*T.")),
        "seed": ("INT", tip("Seed of the noising (one noise per output).", default=0, min=0,
                             max=0xffffffffffffffff, control_after_generate=True)),
        "steps": ("INT", tip(f"S, DDIM steps over the whole schedule (paper: {steps}).", default=steps,
                              min=1, max=1000)),
        "strength": ("FLOAT", tip(f"S_ns, noise strength: int(S_ns*S) steps are run (paper: {strength}).",
                                   default=strength, min=0.01, max=1.0, step=0.01)),
        "tau": ("FLOAT", tip(f"UC where t <= tau*T, Key-E stage C^(t//100) above (paper: {tau}).",
                              default=tau, min=0.0, max=1.0, step=0.01)),
        "num_outputs": ("INT", tip("Independent noisings of the original, denoised together "
                                    f"(paper: {outputs}).", default=outputs, min=1, max=16)),
        "resolution": resolution_input("Each face crop is protected at this size; the output photos keep their "
                                       "own size."),
    }


_PARTS = ("SAMPLER", "SIGMAS", "CONDITIONING")
_PARTS_TIPS = ("The guided DDIM sampler built here (for SamplerCustom).",
               "The DDIM sigmas for steps/strength (sigmas[0] = the noise level).",
               "The scheduled Key-E/UC conditioning (positive; cfg 1.0).")


_KEY_TIPS = ("The working images that were protected: the face crops (or the letterboxed frame), what Make Key-I "
             "inverts (wire them there; photos without a face are left out).",
             "Their Key-Es, one per crop in the same order (wire them to Make Key-I and Save Key).",
             "Which images were protected, and why any were not; then the receipt.",
             "Where each photo was cut (FACE_CROPS): wire it to Make Key-I so the key records the crops and Recover "
             "returns the whole photo.",
             "The receipt (JSON): per face, found or not, identity distance under a recognizer the method was not "
             "guided by, the verdict and the crop size, measured on the delivered photo after 8-bit rounding.")


class _ProtectionNode:
    """What Anonymize and Hide share: their outputs (the result and its parts for rewiring)."""
    RETURN_TYPES = ("IMAGE", "LATENT") + _PARTS + ("IMAGE", "CONDITIONING", "STRING", "FACE_CROPS", "STRING")
    RETURN_NAMES = ("images", "latents", "sampler", "sigmas", "schedule", "originals", "key_e", "report", "crops",
                    "receipt")
    CATEGORY = CATEGORY

    PAPER = (50, 0.6, 0.4, 4)  # steps, strength, tau, outputs (the defaults shown)
    METHOD = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_task_inputs(*cls.PAPER), **cls.guidance_inputs()},
                "optional": {**face_inputs(), "pipeline": pipeline_input(
                    " Here the faces inputs above choose the faces (the pipeline's own choice is not used).")}}

    def _protect_batch(self, method, settings, image, model, vae, face_model, key_e, uncond, resolution, pipeline):
        """Each photo through the face pipeline (:func:`methods.contract.protect`): its chosen faces cropped, each
        crop protected with its own Key-E (one per crop in batch order, or one for all), pasted back; then its
        receipt."""
        images = rgb_batch(image)
        options = (pipeline or PipelineOptions()).with_faces(settings.faces, settings.face_indices, settings.face_mask)
        planned = contract.plan_batch(images, method, face_model, options, resolution)
        positions = planned.positions()
        key_es = dict(zip(positions, KeyE.for_batch(key_e, len(positions)))) if positions else {}
        models = contract.Models(model=model, vae=vae, face_model=face_model,
                                 extra={"key_es": key_es, "uncond": _uncond_entry(uncond)})
        delivery = contract.protect(images, method, models, settings, options, resolution, planned=planned)
        faces = delivery.faces
        first = faces[0].parts
        json_receipt, text = receipt_outputs(delivery.receipts, [delivery.report()], receipt_text)
        return {"ui": {"text": text}, "result": (
            delivery.images,
            {"samples": torch.cat([f.parts["latents"]["samples"] for f in faces])},
            first["sampler"], first["sigmas"], faces[-1].parts["schedule"],
            torch.cat(delivery.crops),
            KeyE.batch_conditioning([f.key for f in faces]),
            "\n".join(text), [d.plan for d in delivery.delivered], json_receipt)}


class DiffPrivacyAnonymize(_ProtectionNode):
    DESCRIPTION = ("Diff-Privacy anonymization (paper Sec. 2.3.3): num_outputs noisings of the original, denoised "
                   "with Key-E above tau and UC below, guided by L_Idis + L_div so every output has a different "
                   "identity from the original and from each other. Defaults are the paper's.")

    PAPER = (50, 0.6, 0.4, 4)

    @staticmethod
    def guidance_inputs():
        return {"guidance_scale": ("FLOAT", tip("lambda, the identity guidance scale (paper: 1).",
                                                default=1.0, min=0.0, max=100.0, step=0.05)),
                "diversity_weight": ("FLOAT", tip("Weight of L_div (outputs apart) against L_Idis (paper: 1).",
                                                  default=1.0, min=0.0, max=100.0, step=0.05))}

    OUTPUT_TOOLTIPS = ("The anonymized photos at their own size (num_outputs per protected photo, in batch order).",
                       "The latents of the protected crops.") + _PARTS_TIPS + _KEY_TIPS
    FUNCTION = "anonymize"
    METHOD = "Diff-Privacy anonymize"

    def anonymize(self, model, vae, face_model, image, key_e, uncond, seed, steps, strength, tau, num_outputs,
                  guidance_scale, diversity_weight, resolution=512, faces="all", face_indices="", face_mask=None,
                  gradient_options=None, pipeline=None):
        settings = diff_privacy.ProtectionSettings(
            "anonymize", seed, steps, strength, tau, num_outputs, guidance_scale=guidance_scale,
            diversity_weight=diversity_weight, faces=faces, face_indices=face_indices, face_mask=face_mask,
            gradient=gradient_options)
        return self._protect_batch(diff_privacy.ANONYMIZE, settings, image, model, vae, face_model, key_e, uncond,
                                   resolution, pipeline)


class DiffPrivacyHide(_ProtectionNode):
    DESCRIPTION = ("Diff-Privacy visual identity hiding (paper Sec. 2.3.4): a strong noising of the original, "
                   "denoised with Key-E above tau and UC below, guided by L_is so that face recognizers still "
                   "recognise the person while people do not. Defaults are the reference code's.")

    PAPER = (100, 0.8, 0.6, 1)  # the reference code's

    @staticmethod
    def guidance_inputs():
        return {"lambda_above": ("FLOAT", tip("Guidance scale where t > tau*T (reference: 1.5).",
                                              default=1.5, min=0.0, max=100.0, step=0.05)),
                "lambda_below": ("FLOAT", tip("Guidance scale where t <= tau*T (reference: 2.5).",
                                              default=2.5, min=0.0, max=100.0, step=0.05)),
                "redetect_every": ("INT", tip(REDETECT_TIP.format(
                    default="10: hiding noises to 0.8 T, so the face can move from the original's place; 7 "
                            "detections per output over the 80 steps run, little next to the UNet"),
                    default=10, min=0, max=1000))}

    OUTPUT_TOOLTIPS = ("The identity-hidden photos at their own size (num_outputs per protected photo, in batch "
                       "order).", "The latents of the protected crops.") + _PARTS_TIPS + _KEY_TIPS
    FUNCTION = "hide"
    METHOD = "Diff-Privacy hide"

    def hide(self, model, vae, face_model, image, key_e, uncond, seed, steps, strength, tau, num_outputs,
             lambda_above, lambda_below, redetect_every=10, resolution=512, faces="all", face_indices="",
             face_mask=None, gradient_options=None, pipeline=None):
        settings = diff_privacy.ProtectionSettings(
            "hide", seed, steps, strength, tau, num_outputs, lambda_above=lambda_above, lambda_below=lambda_below,
            redetect_every=redetect_every, faces=faces, face_indices=face_indices, face_mask=face_mask,
            gradient=gradient_options)
        return self._protect_batch(diff_privacy.HIDE, settings, image, model, vae, face_model, key_e, uncond,
                                   resolution, pipeline)


class DiffPrivacyTextKeyE:
    DESCRIPTION = ("A Key-E made of text, with nothing learnt: the ten stage conditionings C^0..C^9 encoded from "
                   "one prompt (used for every stage) or ten lines (C^0 first). Protection and recovery run as with "
                   "a learnt Key-E, but anyone who guesses the prompt holds this half of the key, and the protected "
                   "image keeps less of the original's look. Also outputs UC, the empty prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", tip("The text encoder of your SD 1.5 checkpoint.")),
            "stage_text": ("STRING", tip("One line for all ten stages, or ten lines for C^0 (t 0-99) ... C^9 "
                                          "(t 900-999).", multiline=True, default="a photo of a person")),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("key_e", "uncond")
    OUTPUT_TOOLTIPS = ("Key-E: one conditioning entry with a batch of ten stages, like Learn / Load Key-E output.",
                       "UC, the empty-prompt conditioning.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY + "/keys"

    def encode(self, clip, stage_text):
        return KeyE.from_texts(clip, stage_text).to_conditioning(), [encode_text(clip, "")]


class DiffPrivacyGradientOptions:
    DESCRIPTION = ("How the guided nodes compute the identity gradient: which decoder (the full VAE, ComfyUI's tiny "
                   "preview decoder, or auto), over the whole frame or only the faces' window, in how many chunks, "
                   "with checkpointing, bf16, channels_last or torch.compile. The output images are always decoded "
                   "with the full VAE. Connect it to Anonymize, Hide, the Guided DDIM Sampler, FSAP or Diffusion "
                   "De-ID (the last two decode the whole frame: the face window does not apply there).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gradient_chunk": ("INT", tip("Back-propagate through the decoder this many outputs at a time. 0: auto, "
                                          "as many as fit the free memory ComfyUI reports (all at once when they "
                                          "fit). Smaller needs less memory for one more decoder pass per chunk.",
                                          default=0, min=0, max=64)),
            **_GRADIENT_INPUTS,
        }}

    RETURN_TYPES = ("GRADIENT_OPTIONS",)
    OUTPUT_TOOLTIPS = ("The gradient settings, for the optional gradient_options input of the guided nodes.",)
    FUNCTION = "options"
    CATEGORY = CATEGORY + "/sampling"

    def options(self, gradient_chunk=0, gradient_decoder="full VAE", face_window=False, gradient_checkpointing=False,
                gradient_precision="auto", channels_last=False, torch_compile=False):
        return (GradientOptions(decoder=gradient_decoder, face_window=bool(face_window), chunk=int(gradient_chunk),
                                checkpointing=bool(gradient_checkpointing), precision=gradient_precision,
                                channels_last=bool(channels_last), compile=bool(torch_compile)),)


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyGradientOptions": DiffPrivacyGradientOptions,
    "DiffPrivacyTextKeyE": DiffPrivacyTextKeyE,
    "DiffPrivacyDDIMSigmas": DiffPrivacyDDIMSigmas,
    "DiffPrivacyGuidedDDIMSampler": DiffPrivacyGuidedDDIMSampler,
    "DiffPrivacyAnonymize": DiffPrivacyAnonymize,
    "DiffPrivacyHide": DiffPrivacyHide,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyGradientOptions": "Diff-Privacy Gradient Options",
    "DiffPrivacyTextKeyE": "Diff-Privacy Text Key-E (nothing learnt)",
    "DiffPrivacyDDIMSigmas": "Diff-Privacy DDIM Sigmas",
    "DiffPrivacyGuidedDDIMSampler": "Diff-Privacy Guided DDIM Sampler",
    "DiffPrivacyAnonymize": "Diff-Privacy Anonymize",
    "DiffPrivacyHide": "Diff-Privacy Hide Identity",
}
