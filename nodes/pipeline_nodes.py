"""The face pipeline's one shared input (:mod:`methods.pipeline`, :mod:`methods.receipt`).

- DiffPrivacyFacePipeline: how every protect node crops, pastes and writes its receipt (FACE_PIPELINE), for their
  optional ``pipeline`` input: face crops (crop factor, feather, which faces) or the whole frame letterboxed.
- DiffPrivacyFaceCrops: the crops a protect node will cut, as images (for Learn Key-E: it learns on the first).
"""
from __future__ import annotations

from ..guidance.face.base import SELECT_MODES
from ..methods.pipeline import (DEFAULT_CROP_FACTOR, DEFAULT_FEATHER, DEFAULT_MASK_GROW, MODES, PipelineOptions,
                                plan_photo)
from .common import CATEGORY, pipeline_input, resolution_input, rgb_batch, tip


class DiffPrivacyFacePipeline:
    DESCRIPTION = ("How the protect nodes treat a photo, as Impact Pack's FaceDetailer does: each chosen face is "
                   "cropped square around its box (crop factor x the box; faces at the border padded, never "
                   "stretched), resized to the working resolution, protected, resized back and pasted through a "
                   "feathered mask into the photo at its own size. Every pixel outside the masks stays the input's. "
                   "'whole frame' protects the photo letterboxed to a square (for photos that are already "
                   "portraits). Connect it to the optional 'pipeline' input of any protect node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mode": (MODES, tip("face crops: each chosen face on its own (group photos, any size). whole frame: the "
                                "photo letterboxed to one square (a portrait where the face fills the frame).",
                                default=MODES[0])),
            "crop_factor": ("FLOAT", tip(f"The crop's side as a multiple of the face box's longer side (FaceDetailer: "
                                         f"{DEFAULT_CROP_FACTOR}). Larger: more context around the face, fewer of "
                                         "the model's pixels on it.", default=DEFAULT_CROP_FACTOR, min=1.0,
                                         max=10.0, step=0.1)),
            "feather": ("INT", tip(f"Pixels over which the pasted mask fades in at its edge (FaceDetailer: "
                                   f"{DEFAULT_FEATHER}); 0 pastes a hard-edged box.", default=DEFAULT_FEATHER,
                                   min=0, max=256)),
            "mask_grow": ("FLOAT", tip("The pasted mask: the face box grown by this factor (forehead, chin, ears); "
                                       "at most crop_factor.", default=DEFAULT_MASK_GROW, min=1.0, max=10.0,
                                       step=0.05)),
            "faces": (SELECT_MODES, tip("Which faces are protected: all, the largest, the ones at face_indices, or "
                                        "those under face_mask. Anonymize and Hide use their own 'faces' inputs "
                                        "instead.", default="all")),
            "face_indices": ("STRING", tip("With faces = indices: comma-separated positions, 0 = the largest face "
                                           "(e.g. '0, 2').", default="")),
        }, "optional": {
            "face_mask": ("MASK", tip("With faces = mask: white over the faces to protect (at the photo's size).")),
            "receipt_model": ("FACE_MODEL", tip("The recognizer the receipt measures with; it must not be the one "
                                                "the method is guided by. Unconnected: dlib's ResNet (L2, 0.6).")),
        }}

    RETURN_TYPES = ("FACE_PIPELINE",)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("The pipeline settings, for the optional 'pipeline' input of the protect nodes.",)
    FUNCTION = "options"
    CATEGORY = CATEGORY

    def options(self, mode, crop_factor, feather, mask_grow, faces, face_indices, face_mask=None,
                receipt_model=None):
        return (PipelineOptions(mode=mode, crop_factor=float(crop_factor), feather=int(feather),
                                mask_grow=float(mask_grow), faces=faces, face_indices=face_indices,
                                face_mask=face_mask, receipt_model=receipt_model).validated(),)


class DiffPrivacyFaceCrops:
    DESCRIPTION = ("The face crops a protect node cuts from a photo with the same face model, pipeline and working "
                   "resolution, as images (largest face first): wire them to Learn Key-E so Key-E is learned on "
                   "what protection and Key-I see (it learns on the first crop).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": ("FACE_MODEL", tip("The face model of the protect node (its detector finds the faces).")),
            "image": ("IMAGE", tip("The photo (one).")),
            "resolution": resolution_input("The crops come out at this size."),
        }, "optional": {"pipeline": pipeline_input()}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("crops",)
    OUTPUT_TOOLTIPS = ("The crops, (faces, resolution, resolution, 3).",)
    FUNCTION = "crops"
    CATEGORY = CATEGORY

    def crops(self, face_model, image, resolution=512, pipeline=None):
        import torch
        from ..guidance.working_image import check_resolution, single_image
        photo = single_image(rgb_batch(image))
        plan = plan_photo(photo, face_model, pipeline, check_resolution(resolution))
        return (torch.cat(plan.cut(photo)),)


NODE_CLASS_MAPPINGS = {"DiffPrivacyFacePipeline": DiffPrivacyFacePipeline, "DiffPrivacyFaceCrops": DiffPrivacyFaceCrops}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyFacePipeline": "Diff-Privacy Face Pipeline",
                              "DiffPrivacyFaceCrops": "Diff-Privacy Face Crops"}
