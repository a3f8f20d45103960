"""Diffusion De-ID (thesis ch. 6) for one image with a fake pool the dataset command built.

The pool (|X_F| > |X_R| fakes from identities drawn uniformly on the identity sphere, each beyond the match threshold
of every real face, ``diffusion-de-id.pool.safetensors``
in the dataset command's keys folder) needs the whole dataset, so it is made by
``scripts/anonymize_dataset.py --method diffusion-de-id``; this node de-identifies a further image against it, through
the pack's one pipeline (``methods.contract.protect`` with ``methods.diffusion_deid.METHOD``): it only adapts.
"""
from __future__ import annotations

from ..guidance.working_image import single_image
from ..inversion.key_e import encode_text
from ..methods import contract
from ..methods import diffusion_deid as deid
from ..methods.receipt import receipt_text
from .common import (CATEGORY, StepProgress, pipeline_input, receipt_outputs, resolution_input, resolve_key_path,
                     rgb_batch, tip, whole_frame_gradient_options)


class DiffPrivacyDiffusionDeID:
    DESCRIPTION = ("Diffusion De-ID (thesis ch. 6) on your SD 1.5: the face is paired with the nearest fake of a pool "
                   "(by CLIP-vision appearance), then the FaceID identity embedding is optimised from the fake's so "
                   "the recognizer no longer links the result to the original (IIS) or takes the fake's identity "
                   "(IRS), while appearance tokens stay close; the image is rendered by DDIM from the original's "
                   "inversion.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("Your SD 1.5 model.")),
            "vae": ("VAE", tip("The model's VAE.")),
            "clip": ("CLIP", tip("The model's text encoder (encodes the prompt every render sees).")),
            "clip_vision": ("CLIP_VISION", tip("The appearance encoder the pool was paired with (CLIP-vision).")),
            "identity_adapter": ("IDENTITY_ADAPTER", tip("A FaceID adapter (ip-adapter-faceid_sd15.bin): its "
                                                         "identity embedding is what is optimised.")),
            "face_model": ("FACE_MODEL", tip("The differentiable recognizer of L_id, with its detector.")),
            "image": ("IMAGE", tip("The face photo to de-identify (one).")),
            "pool_path": ("STRING", tip("The fake pool file (diffusion-de-id.pool.safetensors) made by the dataset "
                                        "command, inside ComfyUI's output or input folder.", default="")),
            "prompt": ("STRING", tip("The prompt of every render.", default="a photo of a person")),
            "objective": (deid.OBJECTIVES, tip("iis: |cos| to the original's identity driven to 0 (the thesis's "
                                               "default); irs: take the paired fake's identity.")),
            "x_t": (deid.X_T_SOURCES, tip("Start the render from the inversion of the real image (keeps pose and "
                                          "background) or of the paired fake.")),
            "iterations": ("INT", tip("Optimisation steps of the embedding (the thesis reports none; 30 allows about "
                                      "a right angle of turn).", default=30, min=0, max=1000)),
            "lambda_att": ("FLOAT", tip("Weight of the appearance loss (L1 of patch tokens, scale-free).",
                                        default=1.0, min=0.0, max=100.0, step=0.05)),
            "steps": ("INT", tip("DDIM steps of the inversion and the final render.", default=50, min=2, max=1000)),
            "resolution": resolution_input("Each face crop is de-identified at this size; the result keeps the "
                                           "photo's size."),
        }, "optional": {
            "face_embedding": ("FACE_EMBEDDING", tip("The original's FaceID-space embedding (Face Embedding with "
                                                     "ArcFace r50): the condition x_T is inverted under.")),
            "gradient_options": whole_frame_gradient_options("the optimisation's gradient"),
            "pipeline": pipeline_input(" With face_embedding connected (one face's identity), one face at a time; "
                                       "without, every chosen face, each against its own."),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "report", "receipt")
    OUTPUT_TOOLTIPS = ("The de-identified photo at its own size (each chosen face's crop pasted back).",
                       "Per face: the paired fake, |cos| to the original during the optimisation, the identity check "
                       "on the delivered crop (still recognised or not) and the pool's smallest real-fake distance.",
                       "The receipt (JSON): per face, found or not, identity distance to the original under a "
                       "recognizer the method was not guided by (dlib by default), the verdict and the crop size, on "
                       "the delivered photo after 8-bit rounding.")
    FUNCTION = "deidentify"
    CATEGORY = CATEGORY

    def deidentify(self, model, vae, clip, clip_vision, identity_adapter, face_model, image, pool_path, prompt,
                   objective, x_t, iterations, lambda_att, steps, resolution=512, face_embedding=None,
                   gradient_options=None, pipeline=None, unique_id=None):
        # the differentiable render walks at most render_steps of the grid: fewer when steps is smaller
        render_steps = min(deid.DeIDSettings.render_steps, int(steps))
        settings = deid.DeIDSettings(objective=objective, x_t=x_t, iterations=int(iterations),
                                     lambda_att=float(lambda_att), steps=int(steps), render_steps=render_steps,
                                     gradient=gradient_options)
        if not pool_path.strip():
            raise ValueError("pool_path is empty: build the pool with scripts/anonymize_dataset.py --method "
                             "diffusion-de-id (it lands in the keys folder), then give its path")
        pool = deid.Pool.load(resolve_key_path("", pool_path))
        real = face_embedding["embedding"][:1] if face_embedding is not None else None
        models = contract.Models(model=model, clip=clip, vae=vae, clip_vision=clip_vision, face_model=face_model,
                                 adapter=identity_adapter, extra={"pool": pool, "real_embedding": real,
                                                                  "conditioning": [encode_text(clip, prompt)]})
        delivery = contract.protect(single_image(rgb_batch(image)), deid.METHOD if real is None else deid.ONE_FACE,
                                    models, settings, pipeline, resolution,
                                    progress=StepProgress(max(settings.iterations, 1), unique_id))
        report = "\n".join(f"face {f.report['face']}: {deid.report_text(f.report, objective)}"
                           for f in delivery.faces)
        receipt, text = receipt_outputs(delivery.receipts, [report], receipt_text)
        return {"ui": {"text": text}, "result": (delivery.images, report, receipt)}


NODE_CLASS_MAPPINGS = {"DiffPrivacyDiffusionDeID": DiffPrivacyDiffusionDeID}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyDiffusionDeID": "Diff-Privacy Diffusion De-ID (one image, with a pool)"}
