"""Classic anonymization baselines as nodes: blur, pixelate or mosaic the detected faces."""
from __future__ import annotations

from ..evaluation.baselines import cover_faces
from .common import rgb_batch

CATEGORY = "Diff-Privacy/evaluation"

_COMMON = {
    "face_model": ("FACE_MODEL", {"tooltip": "Finds the faces to cover (any FACE_MODEL: its detector is used)."}),
    "image": ("IMAGE", {"tooltip": "Images whose faces are covered; each image of the batch separately."}),
}
_OPTIONS = {
    "margin": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.05,
                         "tooltip": "Grow each face box by this fraction of its size on every side (detector boxes "
                                    "are tight: 0.2 also covers forehead and chin)."}),
    "faces": (["all", "largest"], {"default": "all", "tooltip": "Cover every detected face or only the largest."}),
    "if_no_face": (["pass through", "error"], {
        "default": "pass through",
        "tooltip": "pass through: an image without a detected face is returned unchanged (and its mask is empty); "
                   "error: stop with a message naming the image."}),
}


class _BaselineNode:
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The images with their faces covered.", "1 where pixels were changed (the grown face boxes).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY


class DiffPrivacyBlurFaces(_BaselineNode):
    DESCRIPTION = "Baseline: Gaussian blur of the detected face regions (paper Fig. 3)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_COMMON, "sigma_percent": ("FLOAT", {
            "default": 10.0, "min": 0.5, "max": 50.0, "step": 0.5,
            "tooltip": "Blur sigma in percent of the face width (resolution-independent). 2 weak, 5 medium, 10 strong "
                       "(dlib no longer matches most faces from about 5)."}), **_OPTIONS}}

    def apply(self, face_model, image, sigma_percent, margin, faces, if_no_face):
        return cover_faces(face_model, rgb_batch(image), "blur", sigma_percent, margin, faces, if_no_face)


class DiffPrivacyPixelateFaces(_BaselineNode):
    DESCRIPTION = "Baseline: pixelation (square blocks of mean colour) of the detected face regions."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_COMMON, "blocks": ("INT", {
            "default": 6, "min": 2, "max": 128,
            "tooltip": "Blocks across the face width: fewer is stronger. 24 weak, 12 medium, 6 strong."}), **_OPTIONS}}

    def apply(self, face_model, image, blocks, margin, faces, if_no_face):
        return cover_faces(face_model, rgb_batch(image), "pixelate", float(blocks), margin, faces, if_no_face)


class DiffPrivacyMosaicFaces(_BaselineNode):
    DESCRIPTION = ("Baseline: mosaic of the detected face regions: irregular (Voronoi) tiles, each the mean colour "
                   "of its pixels.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_COMMON, "tile_percent": ("FLOAT", {
            "default": 16.0, "min": 1.0, "max": 50.0, "step": 0.5,
            "tooltip": "Tile spacing in percent of the face width: larger is stronger. 4 weak, 8 medium, 16 strong."}),
            **_OPTIONS, "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                                         "tooltip": "Places the tiles; the same seed gives the same mosaic."})}}

    def apply(self, face_model, image, tile_percent, margin, faces, if_no_face, seed):
        return cover_faces(face_model, rgb_batch(image), "mosaic", tile_percent, margin, faces, if_no_face, seed)


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyBlurFaces": DiffPrivacyBlurFaces,
    "DiffPrivacyPixelateFaces": DiffPrivacyPixelateFaces,
    "DiffPrivacyMosaicFaces": DiffPrivacyMosaicFaces,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyBlurFaces": "Diff-Privacy Blur Faces (baseline)",
    "DiffPrivacyPixelateFaces": "Diff-Privacy Pixelate Faces (baseline)",
    "DiffPrivacyMosaicFaces": "Diff-Privacy Mosaic Faces (baseline)",
}
