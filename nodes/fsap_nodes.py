"""FSAP (thesis ch. 5): thin adapters of ``methods.fsap`` (the search) and ``evaluation.fsap_eval`` (the thesis's
comparison row)."""
from __future__ import annotations

import json
import logging

from ..evaluation import fsap_eval
from ..evaluation.lpips import LPIPSUnavailable, load_lpips
from ..methods import contract, fsap
from ..methods.receipt import receipt_text
from .common import (CATEGORY, StepProgress, paired_batches, pipeline_input, receipt_outputs, resolution_input,
                     rgb_batch, tip, whole_frame_gradient_options)

log = logging.getLogger("diffprivacy")
FSAP_CATEGORY = f"{CATEGORY}/fsap"
R = f"{fsap.RESCALE:.4f}"


class DiffPrivacyFSAP:
    DESCRIPTION = (
        "FSAP (thesis ch. 5, Alg. 7): moves the face's identity embedding W (FaceID's identity stream on your SD 1.5 "
        "model, starting at the original's own embedding) with sign-gradient steps until the recognizer's identity "
        "loss L_I = 1 - cos(f(x), f(x_hat)) exceeds tau, keeping the face region close with k perceptual steps per "
        "iteration (MSE + SSIM + LPIPS when its weights are in models/lpips/). Losses are taken on a cheap "
        "differentiable render: the decoded x0 prediction of ONE UNet call from the original's DDIM-inverted latent "
        "at the chosen timestep. When that stand-in passes tau, the image that would be delivered (the full DDIM "
        "render) is checked too, and only its L_I counts: the reported L_I and 'reached' are measured on the "
        "delivered image. The output is a full deterministic DDIM render from that latent with the found W. "
        "Cancel stops the search early and renders the best W so far. Text conditioning runs at cfg 1 (no negative).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("Your SD 1.5 checkpoint's model; the identity stream is added to a clone here.")),
            "vae": ("VAE", tip("The checkpoint's VAE: encodes the original, decodes every render (with gradients).")),
            "positive": ("CONDITIONING", tip("A plain description of the photo (e.g. 'a photo of a person'). Used "
                                             "for the inversion, the renders and the final DDIM, at cfg 1.")),
            "identity_adapter": ("IDENTITY_ADAPTER", tip("A FaceID adapter (ip-adapter-faceid_sd15.bin or "
                                                         "-faceid-plusv2) from the identity adapter loader.")),
            "face_embedding": ("FACE_EMBEDDING", tip("The ORIGINAL face's embedding (Face Embedding on the same "
                                                     "photo, ArcFace r50 of buffalo_l): W starts here.")),
            "image": ("IMAGE", tip("The photo to de-identify (one image).")),
            "face_model": ("FACE_MODEL", tip("The recognizer f of L_I (differentiable: FaceNet-CASIA, ArcFace); its "
                                             "detector finds the face region. dlib is refused (evaluation only).")),
            "tau": ("FLOAT", tip("Stop once L_I = 1 - cos(f(x), f(x_hat)) > tau on the delivered image (checked "
                                 "whenever the cheap stand-in passes; a cosine distance in (0, 2]; thesis 0.8). "
                                 "Higher = further from the original identity.",
                                 default=fsap.THESIS_DEFAULTS["tau"], min=0.01, max=2.0, step=0.01)),
            "lambda_i": ("FLOAT", tip(f"Identity step per embedding component: W += lambda_I * sign(dL_I/dW). Thesis "
                                      f"0.02 on StyleGAN W+ (components of order 1), rescaled by 1/sqrt(512) = {R} "
                                      f"to the unit-sphere embedding (components ~0.044): default "
                                      f"{fsap.LAMBDA_I:.2e}.", default=round(fsap.LAMBDA_I, 7), min=0.0, max=0.1,
                                      step=1e-5, round=1e-7)),
            "lambda_p": ("FLOAT", tip(f"Perceptual step per component: W -= lambda_P * (sign dMSE + sign dLPIPS + "
                                      f"sign dSSIM). Thesis 0.008 x {R} = {fsap.LAMBDA_P:.2e}. 0 = identity loss "
                                      "only (the thesis's ablation).", default=round(fsap.LAMBDA_P, 7), min=0.0,
                                      max=0.1, step=1e-5, round=1e-7)),
            "k": ("INT", tip("Perceptual steps after each identity step (thesis 6).", default=fsap.THESIS_DEFAULTS["k"],
                             min=0, max=100)),
            "max_iterations": ("INT", tip("N: outer iterations at most (thesis 100). Each costs 1 + k UNet + decoder "
                                          "forward/backward passes.", default=fsap.THESIS_DEFAULTS["n"], min=0,
                                          max=10000)),
            "timestep": ("FLOAT", tip("The chosen timestep as a fraction of T: the original is DDIM-inverted to it, "
                                      "renders start from there. Lower keeps more of the photo, higher lets the "
                                      "identity move more.", default=0.5, min=0.05, max=1.0, step=0.05)),
            "steps": ("INT", tip("DDIM grid of the whole run (the inversion and the final render take "
                                 "timestep x steps of them).", default=50, min=1, max=1000)),
            "latent_step": ("FLOAT", tip("0: move W only. > 0: also sign-step the inverted latent, with steps this "
                                         "many times lambda relative to the latent's own component size.",
                                         default=0.0, min=0.0, max=10.0, step=0.05)),
            "identity_weight": ("FLOAT", tip("w of the identity stream (FaceID).", default=1.0, min=0.0, max=5.0,
                                             step=0.05)),
            "perceptual_mode": (list(fsap.PERCEPTUAL_MODES), tip(
                "batched: the perceptual losses' gradients as rows of one forward/backward (fast, memory x3); "
                "sequential: one forward, one backward per loss (less memory).", default="batched")),
            "resolution": resolution_input("The search works on the face crop at this size; the output keeps the "
                                           "photo's size."),
        }, "optional": {
            "clip_vision": ("CLIP_VISION", tip("CLIP-ViT-H, only for FaceID Plus adapters (reads the aligned crop).")),
            "gradient_options": whole_frame_gradient_options("the cheap render's gradient"),
            "pipeline": pipeline_input(" FSAP moves one face's embedding: one face at a time (unconnected: the "
                                       "largest)."),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE", "IMAGE", "FACE_EMBEDDING", "STRING", "FLOAT", "STRING")
    RETURN_NAMES = ("image", "loss_curve", "found_embedding", "report", "identity_loss", "receipt")
    OUTPUT_TOOLTIPS = ("The de-identified photo at its own size: the face crop's full DDIM render with the found W, "
                       "pasted back through the feathered mask.",
                       "L_I (red) and L_P (blue) per iteration, tau dashed; shown live on the node while it runs.",
                       "The found W as a FACE_EMBEDDING (for Apply Identity Streams).",
                       "Final L_I on the delivered image (and the stand-in's), iterations, whether tau was reached "
                       "on the delivered image, iterations where only the stand-in passed, LPIPS used or absent.",
                       "Final L_I measured on the delivered image (8-bit, the original's landmarks).",
                       "The receipt (JSON): the face found or not, identity distance to the original under a "
                       "recognizer FSAP was not guided by (dlib by default), the verdict and the crop size, on the "
                       "delivered photo after 8-bit rounding.")
    FUNCTION = "run"
    CATEGORY = FSAP_CATEGORY

    def run(self, model, vae, positive, identity_adapter, face_embedding, image, face_model, tau, lambda_i, lambda_p,
            k, max_iterations, timestep, steps, latent_step, identity_weight, perceptual_mode, resolution,
            clip_vision=None, gradient_options=None, pipeline=None, unique_id=None):
        settings = fsap.FSAPSettings(tau=tau, lambda_i=lambda_i, lambda_p=lambda_p, k=k, n=max_iterations,
                                     steps=steps, strength=timestep, latent_step=latent_step,
                                     identity_weight=identity_weight, perceptual_mode=perceptual_mode,
                                     gradient=gradient_options)
        images = rgb_batch(image)
        if images.shape[0] != 1:
            raise ValueError(f"FSAP moves one face's embedding: one photo at a time; got a batch of {images.shape[0]} "
                             "images: split the batch")
        try:
            lpips, lpips_note = load_lpips(), None
        except LPIPSUnavailable as e:
            lpips, lpips_note = None, str(e)
        models = contract.Models(model=model, vae=vae, face_model=face_model, clip_vision=clip_vision,
                                 adapter=identity_adapter, extra={"conditioning": positive, "lpips": lpips,
                                                                  "face_embedding": face_embedding})
        bar = StepProgress(max(settings.n, 1), unique_id)

        def progress(step):  # the live loss curve: the history the search sends with each iteration's Step
            bar(step, preview=("PNG", fsap.curve_pil(step.detail["history"], settings.tau), 512))

        delivery = contract.protect(images, fsap.METHOD, models, settings, pipeline, resolution, progress)
        (done,) = delivery.delivered
        (face,) = done.result.faces
        result = face.parts["result"]
        report = face.report["text"] + (f"\nLPIPS absent: {lpips_note}" if lpips_note else "")
        found = dict(face_embedding, embedding=result.w.float().cpu(), warning=None)
        receipt, text = receipt_outputs(delivery.receipts, [report], receipt_text)
        return {"ui": {"text": text}, "result": (done.images, fsap.curve_image(result.history, settings.tau), found,
                                                 report, float(result.l_i), receipt)}


class DiffPrivacyFSAPEvaluation:
    DESCRIPTION = ("The thesis's FSAP comparison row (ch. 5, Tables 5.1-5.3): SPR with dlib (L2 0.6) and a second "
                   "recognizer (FaceNet, L2 1.1), SDR (dlib detection), dlib 68-point landmark distances for chin / "
                   "nose / eyes / mouth (pixels) and MSE ([0, 1] pixels); the thesis's printed rows below for "
                   "reference. A protected image without a detected face counts as not protected, as in the thesis.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dlib_face_model": ("FACE_MODEL", tip("dlib's model (Dlib Face Model node): SPR 'FR-lib', SDR, the 68 "
                                                  "landmarks.")),
            "face_model": ("FACE_MODEL", tip("The second SPR column: FaceNet (the pack's FaceNet-CASIA, L2 1.1; the "
                                             "thesis used VGGFace2).")),
            "original": ("IMAGE", tip("The unprotected images.")),
            "protected": ("IMAGE", tip("The protected images, in the same order.")),
            "method": ("STRING", tip("Row name in the table.", default="FSAP (this pack)")),
        }}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("table", "details")
    OUTPUT_TOOLTIPS = ("Markdown table: this row, then the thesis's rows (other data and recognizers: for orientation "
                       "only).", "JSON: every number per image.")
    FUNCTION = "measure"
    OUTPUT_NODE = True  # shows its table on the node, nothing needs to consume it
    CATEGORY = FSAP_CATEGORY

    def measure(self, dlib_face_model, face_model, original, protected, method):
        original, protected = paired_batches(original, protected, "original", "protected")
        recognizers = {"dlib": dlib_face_model, face_model.name: face_model}
        row = fsap_eval.fsap_comparison(original, protected, dlib_face_model, recognizers,
                                        StepProgress(len(original)))
        table = fsap_eval.comparison_table({method: row})
        return {"ui": {"text": [table]}, "result": (table, json.dumps(row, default=str, indent=1))}


NODE_CLASS_MAPPINGS = {"DiffPrivacyFSAP": DiffPrivacyFSAP, "DiffPrivacyFSAPEvaluation": DiffPrivacyFSAPEvaluation}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyFSAP": "Diff-Privacy FSAP (feature-space adversarial de-identification)",
                              "DiffPrivacyFSAPEvaluation": "Diff-Privacy FSAP Evaluation (thesis comparison row)"}
