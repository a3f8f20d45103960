"""DP-Image (thesis ch. 4) on the identity embedding: thin adapters of ``guidance.dp_identity`` (the mechanism and
its ε) and ``methods.dp_render`` (the strict and in-the-photo renderings, labelled).

A DP release is a FACE_EMBEDDING whose ``embedding`` is the noised one, with the original's aligned crops and
landmarks dropped (they are not protected by the noise), and a ``dp`` entry: {"report": the ε report dict,
"noise_seed": int}.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from ..guidance import dp_identity as dpi
from ..guidance.working_image import photo_mask, single_image
from ..methods import contract, dp_render
from ..methods.pipeline import mask_plan
from ..methods.receipt import receipt_json, receipt_text, unavailable_receipt
from .common import (CATEGORY, StepProgress, pipeline_input, receipt_outputs, resolution_input, rgb_batch, tip,
                     write_new_output_file)

log = logging.getLogger("diffprivacy")
DP_CATEGORY = f"{CATEGORY}/dp-image"
NOISE_BY = ("sigma", "target epsilon")

REQUIRES = {"DiffPrivacyDPIdentity": ("dp_accounting",)}


class DiffPrivacyDPIdentity:
    DESCRIPTION = ("DP-Image (thesis ch. 4) on the identity embedding: clips the face embedding to an L2 ball of "
                   "radius C (sensitivity Δ = 2C for any two faces), adds Gaussian noise N(0, σ²I), optionally "
                   "renormalises (free post-processing). ε comes from Google's dp-accounting (analytic Gaussian, "
                   "composed over T rounds; RDP as a second line), for the given σ or with σ solved from a target "
                   "ε. The thesis's own bound αΔ²/(2Tσ²) is shown beside it, labelled, never used. At any useful ε "
                   "the released identity is essentially random (σ = 1: cosine ≈ 0.04 to the original). The output "
                   "carries only the noised embedding: the original's face crop and landmarks are dropped.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_embedding": ("FACE_EMBEDDING", tip(
                "The original's identity from Face Embedding (arcface-r50 of buffalo_l: FaceID's space; unit norm).")),
            "clip_radius": ("FLOAT", tip("C: embeddings are scaled into the L2 ball of this radius; the sensitivity "
                                         "is Δ = 2C. 1 keeps unit embeddings unchanged.",
                                         default=1.0, min=0.0, max=100.0, step=0.01)),
            "noise_by": (list(NOISE_BY), tip("sigma: you set σ and get ε. target epsilon: σ is solved so that T "
                                             "rounds reach exactly the target (ε, δ).", default="sigma")),
            "sigma": ("FLOAT", tip("σ: standard deviation of the Gaussian noise per coordinate (used when noise_by "
                                   "= sigma). Δ = 2, δ = 1e-5: σ 1 → ε ≈ 10.0, σ 2 → 4.38, σ 4 → 1.99.",
                                   default=1.0, min=0.0, max=10000.0, step=0.01)),
            "target_epsilon": ("FLOAT", tip("The ε to reach (used when noise_by = target epsilon).",
                                            default=10.0, min=0.0, max=100000.0, step=0.1)),
            "delta": ("FLOAT", tip("δ, strictly between 0 and 1: the probability the ε statement may fail. Keep it "
                                   "far below 1 / (number of people), e.g. 1e-5.",
                                   default=1e-5, min=0.0, max=1.0, step=1e-6, round=False)),
            "rounds": ("INT", tip("T: rounds of the thesis's iterated form (each re-embeds the face rendered from "
                                  "the previous round; DP Render runs rounds 2..T). ε is accounted by composition "
                                  "over T rounds; T = 1 is a single release.", default=1, min=0, max=dpi.MAX_ROUNDS)),
            "renormalize": ("BOOLEAN", tip("Put the noised embedding back on the unit sphere (as FaceID expects); "
                                           "post-processing, so ε is unchanged.", default=True)),
            "noise_seed": ("INT", tip("0: fresh secret noise from the OS (the only private choice). Any other value "
                                      "is reproducible and NOT private: the seed is saved with the workflow and "
                                      "whoever has it can remove the noise. For tests and comparisons.",
                                      default=0, min=0, max=2 ** 62)),
        }}

    RETURN_TYPES = ("FACE_EMBEDDING", "STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("noised_embedding", "epsilon_report", "epsilon", "sigma")
    OUTPUT_TOOLTIPS = (
        "The noised identity (only the embedding and the DP parameters; no crop, no landmarks), for DP Render or "
        "Apply Identity Streams.",
        "ε, δ and how they were obtained, the RDP line, and the thesis's bound labelled as such.",
        "ε of the T released embeddings (dp-accounting, analytic Gaussian composed over T rounds).",
        "σ used (given, or solved from the target ε).")
    FUNCTION = "release"
    CATEGORY = DP_CATEGORY

    def release(self, face_embedding, clip_radius, noise_by, sigma, target_epsilon, delta, rounds, renormalize,
                noise_seed):
        emb = face_embedding.get("embedding") if isinstance(face_embedding, dict) else None
        if emb is None or emb.dim() != 2 or emb.shape[0] == 0:
            raise ValueError("no face embedding: the Face Embedding node found no face to release")
        if face_embedding.get("dp") is not None:
            raise ValueError("this embedding is already a DP release; noising it again would account it wrongly: "
                             "connect the original Face Embedding")
        if noise_by not in NOISE_BY:
            raise ValueError(f"noise_by must be one of {NOISE_BY}; got {noise_by!r}")
        report = dpi.account(clip_radius, sigma if noise_by == "sigma" else None, delta, rounds, renormalize,
                             target_epsilon=target_epsilon if noise_by != "sigma" else None, seed=noise_seed)
        z = dpi.release(emb, report.clip_radius, report.sigma, dpi.seeded(noise_seed, 0), renormalize)
        out = {"embedding": z, "crops_224": None, "landmarks": None,
               "batch_index": list(face_embedding.get("batch_index", range(z.shape[0]))),
               "model": face_embedding.get("model", "?"), "warning": face_embedding.get("warning"),
               "dp": {"report": report.to_dict(), "noise_seed": int(noise_seed)}}
        text = report.text()
        log.info("[Diff-Privacy] DP identity release:\n%s", text)
        return out, text, float(report.epsilon), float(report.sigma)


class DiffPrivacyDPRender:
    DESCRIPTION = ("Renders a DP identity release through the FaceID identity stream on your SD 1.5 model, labelled. "
                   "strict (the DP statement holds): generated from fresh latent noise with your prompt text, encoded "
                   "here; the photo is never read, and a MODEL or CLIP carrying anything beyond the checkpoint "
                   "(streams, attention patches, LoRAs) or a connected CONDITIONING is refused by name. The label is "
                   "computed from what went in. in the photo (NOT DP): the photo's face region inpainted with the "
                   "noised identity; pose, background and hair still come from the original. With T > 1 rounds it "
                   "runs the thesis's iteration: each round's render is re-embedded (face_model) and noised again. "
                   "The label (JSON) says which, with ε and δ; save it with Save DP Image as the sidecar.")

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers
        return {"required": {
            "model": ("MODEL", tip("Your SD 1.5 checkpoint's MODEL, straight from Load Checkpoint. strict refuses a "
                                   "MODEL carrying identity/style streams, attention or block patches, wrappers or "
                                   "LoRAs: they may carry the original; DP Render adds the noised stream itself.")),
            "vae": ("VAE", tip("The checkpoint's VAE.")),
            "clip": ("CLIP", tip("The checkpoint's CLIP, straight from Load Checkpoint: the prompt text is encoded "
                                 "with it here (strict refuses a CLIP carrying a LoRA or other patches).")),
            "prompt": ("STRING", tip("A fixed prompt, e.g. 'a portrait photo of a person'. It must not describe the "
                                     "original (that would bypass the noise); it is written into the label. No "
                                     "'embedding:' names in strict mode.",
                                     default="a portrait photo of a person, neutral background", multiline=True)),
            "negative_prompt": ("STRING", tip("Negative prompt text (encoded here with clip).",
                                              default="blurry, lowres, deformed", multiline=True)),
            "identity_adapter": ("IDENTITY_ADAPTER", tip("ip-adapter-faceid_sd15.bin (plain FaceID: it reads only "
                                                         "the embedding; FaceID Plus is refused).")),
            "noised_embedding": ("FACE_EMBEDDING", tip("The release from DP Identity.")),
            "mode": (list(dpi.RENDER_MODES), tip("strict: generation from fresh noise, differentially private. in "
                                                 "the photo: inpainting of the face region, NOT differentially "
                                                 "private.", default=dpi.STRICT)),
            "seed": ("INT", tip("Seed of the latent noise of the render (public; independent of the face).",
                                default=0, min=0, max=2 ** 62)),
            "steps": ("INT", tip("Sampling steps.", default=30, min=1, max=200)),
            "cfg": ("FLOAT", tip("Classifier-free guidance scale.", default=5.0, min=0.0, max=30.0, step=0.1)),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, tip("Sampler.", default="dpmpp_2m")),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, tip("Scheduler.", default="karras")),
            "width": ("INT", tip("strict: image width (multiple of 8).", default=512, min=64, max=2048, step=8)),
            "height": ("INT", tip("strict: image height (multiple of 8).", default=512, min=64, max=2048, step=8)),
            "identity_weight": ("FLOAT", tip("Weight of the identity stream.", default=1.0, min=0.0, max=5.0,
                                             step=0.05)),
            "denoise": ("FLOAT", tip("in the photo: how far the face region is re-noised (1 = fully).", default=0.8,
                                     min=0.0, max=1.0, step=0.01)),
        }, "optional": {
            "positive": ("CONDITIONING", tip("in the photo only: a CONDITIONING of your own instead of the prompt "
                                             "text. strict refuses it: a CONDITIONING can hold image tokens or "
                                             "embeddings made from the original.")),
            "negative": ("CONDITIONING", tip("in the photo only: the negative CONDITIONING to go with positive "
                                             "(strict refuses it).")),
            "image": ("IMAGE", tip("in the photo: the photo whose face region is replaced (ignored in strict).")),
            "face_model": ("FACE_MODEL", tip("Finds the face region (in the photo, when no mask) and re-embeds each "
                                             "round's render when T > 1 (use the one that made the embedding).")),
            "mask": ("MASK", tip("in the photo: the region to inpaint (white, at the photo's size); default the "
                                 "detected face box.")),
            "resolution": resolution_input("in the photo: the face crop is rendered at this size; the photo keeps "
                                           "its own."),
            "pipeline": pipeline_input(" in the photo: one face (one released identity; unconnected: the "
                                       "largest)."),
        }}

    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "privacy_label", "receipt")
    OUTPUT_TOOLTIPS = ("The rendered image(s): strict, at width x height; in the photo, the photo at its own size with "
                       "the face crop's render pasted back.",
                       "JSON: strict (differentially private, with ε, δ) or in the photo (NOT differentially "
                       "private), and the mechanism's parameters; Save DP Image writes it beside the PNG.",
                       "in the photo: the receipt (JSON): the face found or not, identity distance to the original "
                       "under the receipt's recognizer (dlib by default), the verdict and the crop size, on the "
                       "delivered photo after 8-bit rounding. strict: no photo, so no receipt (says so).")
    FUNCTION = "render"
    CATEGORY = DP_CATEGORY

    def render(self, model, vae, clip, prompt, negative_prompt, identity_adapter, noised_embedding, mode, seed, steps,
               cfg, sampler_name, scheduler, width, height, identity_weight, denoise, positive=None, negative=None,
               image=None, face_model=None, mask=None, resolution=512, pipeline=None):
        in_photo = mode == dpi.IN_PHOTO and image is not None
        settings = dp_render.RenderSettings(mode, seed, steps, cfg, sampler_name, scheduler, prompt, negative_prompt,
                                            width, height, identity_weight, denoise, mask if in_photo else None)
        models = contract.Models(model=model, clip=clip, vae=vae, face_model=face_model, adapter=identity_adapter,
                                 extra={"release": noised_embedding, "positive": positive, "negative": negative})
        progress = StepProgress(int((noised_embedding.get("dp") or {}).get("report", {}).get("rounds", 1)))
        if not in_photo:  # strict (or the photo mode without a photo, which render_release refuses by name)
            images, label = dp_render.render_release(models, settings, progress=progress)
            receipt = unavailable_receipt("strict: no photo was read, nothing to compare", "DP render (strict)")
            return {"ui": {"text": [receipt_text(receipt)]},
                    "result": (images, dpi.label_text(label), receipt_json(receipt))}
        if face_model is None and mask is None:
            raise ValueError("'in the photo' rendering needs face_model (its detector finds the face to crop) or "
                             "a mask over the region to render")
        photo = single_image(rgb_batch(image))
        if mask is not None:
            m = photo_mask(mask, 0)
            if tuple(m.shape) != tuple(photo.shape[1:3]):
                raise ValueError(f"the mask is {m.shape[1]}x{m.shape[0]} but the photo is {photo.shape[2]}x"
                                 f"{photo.shape[1]}: use a mask of the photo's size")
        planned = None
        if face_model is None:  # the crop goes around the mask's region
            planned = contract.Planned([(0, photo[0], mask_plan(photo[0], mask, pipeline, resolution))], [], 1)
        delivery = contract.protect(photo, dp_render.IN_PHOTO, models, settings, pipeline, resolution,
                                    progress=progress, planned=planned)
        receipt, text = receipt_outputs(delivery.receipts, [], receipt_text)
        return {"ui": {"text": text}, "result": (delivery.images, dpi.label_text(delivery.faces[0].report["label"]),
                                                 receipt)}


class DiffPrivacySaveDPImage:
    DESCRIPTION = ("Saves DP-Image renders as PNG without any metadata (no workflow: it would hold the noise seed "
                   "and the original's file name) and, beside each, a JSON sidecar with the privacy label: strict "
                   "(differentially private, ε, δ) or in the photo (NOT differentially private).")
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = DP_CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", tip("The rendered images.")),
            "privacy_label": ("STRING", tip("The label from DP Render (JSON).", forceInput=True)),
            "filename_prefix": ("STRING", tip("Path and name prefix under the output folder; a counter is appended. "
                                              "Do not put the original's name in it.", default="diffprivacy/dp-image")),
        }}

    def save(self, images, privacy_label, filename_prefix="diffprivacy/dp-image"):
        from PIL import Image
        try:
            label = json.loads(privacy_label)
        except (TypeError, ValueError):
            raise ValueError("privacy_label must be the JSON label from DP Render") from None
        if not isinstance(label, dict) or "differentially_private" not in label or "statement" not in label:
            raise ValueError("privacy_label must be the JSON label from DP Render (it has no privacy statement)")
        results = []
        for i, image in enumerate(rgb_batch(images)):
            pixels = np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)

            def write(path, img=img):
                if path.with_suffix(".json").exists():
                    raise FileExistsError(path)
                with open(path, "xb") as f:
                    img.save(f, format="PNG")  # PIL writes no text chunks unless given pnginfo
                sidecar = dict(label, image=path.name, index_in_batch=i)
                with open(path.with_suffix(".json"), "x") as f:
                    json.dump(sidecar, f, indent=1, ensure_ascii=False)
            path, shown = write_new_output_file(filename_prefix, ".png", write, (img.width, img.height))
            sub = shown.rsplit("/", 1)[0] if "/" in shown else ""
            results.append({"filename": path.name, "subfolder": sub, "type": "output"})
        return {"ui": {"images": results, "text": [label["statement"]]}}


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyDPIdentity": DiffPrivacyDPIdentity,
    "DiffPrivacyDPRender": DiffPrivacyDPRender,
    "DiffPrivacySaveDPImage": DiffPrivacySaveDPImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyDPIdentity": "Diff-Privacy DP Identity (DP-Image: noised embedding + ε)",
    "DiffPrivacyDPRender": "Diff-Privacy DP Render (strict / in the photo, labelled)",
    "DiffPrivacySaveDPImage": "Diff-Privacy Save DP Image (PNG + privacy sidecar)",
}
