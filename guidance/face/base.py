"""The FACE_MODEL contract: what identity guidance and every evaluation code against.

A :class:`FaceModel` is a face detector (boxes + 5 landmarks for every face) and a face
recognizer (embedding + distance + verification threshold) behind one object, the value the
ComfyUI type ``FACE_MODEL`` carries. The pack's own models are assembled from a
:class:`Detector` and a :class:`Recognizer` (see ``loader.py``); a subclass may override
``detect``/``embed`` directly (the dlib evaluation model does).

Conventions shared by every implementation:

* ``detect`` takes ONE image in ComfyUI's IMAGE layout, (H, W, 3) float in [0, 1], and
  returns every face, largest box first.
* ``embed`` takes images in torch layout, (B, 3, H, W) float in [0, 1], plus the 5 landmarks
  per image in pixel coordinates of those images; it aligns and embeds, differentiably when
  ``differentiable`` is true.
* Landmark order is insightface/ArcFace's: left eye, right eye, nose tip, left mouth corner,
  right mouth corner, where "left" means the image's left (smaller x).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

METRICS = ("cosine", "l2")


@dataclass
class Face:
    box: torch.Tensor        # (4,) float: x1, y1, x2, y2 in pixels of the analysed image
    landmarks: torch.Tensor  # (5, 2) float x, y pixels, insightface order (see module doc)
    score: float

    @property
    def area(self) -> float:
        w = float(self.box[2] - self.box[0])
        h = float(self.box[3] - self.box[1])
        return max(w, 0.0) * max(h, 0.0)


class NoFaceError(ValueError):
    """No face was found in an image; the message names the image's index in the batch."""

    def __init__(self, batch_index: int | None = None, detail: str = ""):
        self.batch_index = batch_index
        where = "the image" if batch_index is None else f"image {batch_index} of the batch"
        msg = f"No face was detected in {where}"
        if detail:
            msg += f" ({detail})"
        msg += (". Use a photo with a clearly visible, roughly frontal face, or another detector in the "
                "face model loader; analysis nodes also offer to pass images without faces through.")
        super().__init__(msg)


CHOOSE_MODES = ("largest", "index", "all")


def choose_faces(faces: list[Face], mode: str = "largest", index: int = 0,
                 batch_index: int | None = None) -> list[Face]:
    """Pick faces from a detector's output.

    ``largest``: the face with the largest box (one face); ``index``: the ``index``-th face in
    the detector's order (largest first); ``all``: every face. Raises :class:`NoFaceError`
    when ``faces`` is empty and ``ValueError`` for an index out of range or an unknown mode.
    """
    if mode not in CHOOSE_MODES:
        raise ValueError(f"face choice must be one of {CHOOSE_MODES}, got {mode!r}")
    if not faces:
        raise NoFaceError(batch_index)
    if mode == "all":
        return list(faces)
    if mode == "largest":
        return [max(faces, key=lambda f: f.area)]
    if not 0 <= index < len(faces):
        where = "" if batch_index is None else f" in image {batch_index} of the batch"
        raise ValueError(f"face index {index} is out of range: {len(faces)} face(s) were detected{where} "
                         f"(indices 0..{len(faces) - 1}, largest first)")
    return [faces[index]]


SELECT_MODES = ("all", "largest", "indices", "mask")


def crop_faces(faces: list[Face], mask: torch.Tensor | None = None) -> list[Face]:
    """The faces a face crop is about: those its face ``mask`` (R, R) covers (the face the crop was cut around,
    not a neighbour that also shows in it), largest first; every face when ``mask`` is None (a whole-frame crop)."""
    faces = sorted(faces, key=lambda f: -f.area)
    if mask is None:
        return faces
    return [faces[i] for i in select_faces(faces, "mask", mask=mask)[0]]


def parse_indices(text: str) -> list[int]:
    """Face indices from text such as "0, 2" (0 = the largest face)."""
    try:
        return sorted({int(t) for t in str(text).replace(";", ",").split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"face indices must be whole numbers separated by commas (0 is the largest face), "
                         f"got {text!r}") from None


def select_faces(faces: list[Face], mode: str = "all", indices=(), mask: torch.Tensor | None = None,
                 mask_cover: float = 0.5) -> tuple[list[int], list[int]]:
    """Split detected faces (the detector's order, largest first) into (chosen, others) index lists.

    ``all``: every face; ``largest``: the largest box; ``indices``: the given positions (0-based, largest
    first); ``mask``: the faces whose box ``mask`` (H, W) covers by at least ``mask_cover`` (pixels > 0.5).
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"face choice must be one of {SELECT_MODES}, got {mode!r}")
    n = len(faces)
    if mode == "all":
        chosen = list(range(n))
    elif mode == "largest":
        chosen = [max(range(n), key=lambda i: faces[i].area)] if n else []
    elif mode == "indices":
        indices = parse_indices(indices) if isinstance(indices, str) else sorted({int(i) for i in indices})
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"face indices {bad} are out of range: {n} face(s) were detected (indices 0..{n - 1}, "
                             "largest first)")
        if not indices:
            raise ValueError("face choice 'indices' needs face indices, e.g. '0, 2' (0 is the largest face)")
        chosen = indices
    else:
        if mask is None:
            raise ValueError("face choice 'mask' needs a MASK: connect one (white over the faces to choose)")
        m = mask.float().reshape(mask.shape[-2:]) > 0.5
        h, w = m.shape
        chosen = []
        for i, f in enumerate(faces):
            x1, y1, x2, y2 = (int(round(float(v))) for v in f.box)
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
            if x2 > x1 and y2 > y1 and m[y1:y2, x1:x2].float().mean() >= mask_cover:
                chosen.append(i)
    return chosen, [i for i in range(n) if i not in chosen]


class Detector(abc.ABC):
    """Finds faces. Subclasses implement :meth:`detect`."""

    name: str = "detector"

    @abc.abstractmethod
    def detect(self, image: torch.Tensor) -> list[Face]:
        """All faces in one (H, W, 3) [0, 1] image, largest first."""


class Recognizer(torch.nn.Module, metaclass=abc.ABCMeta):
    """A frozen embedding network plus what is needed to align faces for it.

    ``template`` is the (5, 2) landmark template in pixels of a ``crop_size`` square crop;
    ``forward`` takes aligned crops (B, 3, crop_size, crop_size) in [0, 1] and returns (B, D)
    embeddings (it does its own input normalisation).
    """

    name: str = "recognizer"
    metric: str = "cosine"
    threshold: float = 0.5
    crop_size: int = 112
    normalize_output: bool = True  # L2-normalise embeddings (both metrics here compare unit vectors)

    @abc.abstractmethod
    def template(self) -> torch.Tensor:
        """The (5, 2) landmark template in pixels of a ``crop_size`` square crop."""


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, D), (B, D) -> (B,) distances: ``1 - cos`` for "cosine", Euclidean for "l2"."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"embeddings must both be (B, D) with the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1)
    if metric == "l2":
        return (a - b).norm(dim=1)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


class FaceModel:
    """Detector + recognizer + metric + threshold: the FACE_MODEL type.

    Built from a :class:`Detector` and a :class:`Recognizer`, or subclassed with its own
    ``detect``/``embed`` (then pass ``detector``/``recognizer`` as None and set the attributes).
    """

    def __init__(self, detector: Detector | None = None, recognizer: Recognizer | None = None, *,
                 name: str | None = None, metric: str | None = None, threshold: float | None = None,
                 differentiable: bool | None = None):
        self.detector = detector
        self.recognizer = recognizer
        if name is None:
            parts = [p.name for p in (recognizer, detector) if p is not None]
            name = "+".join(parts) if parts else type(self).__name__
        self.name = name
        self.metric = metric if metric is not None else (recognizer.metric if recognizer is not None else "l2")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        self.threshold = float(threshold if threshold is not None else
                               (recognizer.threshold if recognizer is not None else 0.6))
        self.differentiable = bool(differentiable if differentiable is not None else recognizer is not None)

    def __repr__(self) -> str:
        return (f"FaceModel({self.name!r}, metric={self.metric!r}, threshold={self.threshold}, "
                f"differentiable={self.differentiable})")

    def detect(self, image: torch.Tensor) -> list[Face]:
        """All faces in one (H, W, 3) [0, 1] image, largest first."""
        if self.detector is None:
            raise ValueError(f"{self.name} has no detector: use a face model that detects faces")
        return self.detector.detect(image)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Align ``images`` (B, 3, H, W) by ``landmarks`` (B, 5, 2) and embed them: (B, D)."""
        if self.recognizer is None:
            raise ValueError(f"{self.name} has no recognizer: use a face model with a recognizer")
        from .align import align_faces  # local: align imports this module
        rec = self.recognizer
        crops = align_faces(images, landmarks, rec.template().to(images.device), rec.crop_size)
        param = next(rec.parameters(), None)
        if param is not None and (crops.dtype != param.dtype or crops.device != param.device):
            crops = crops.to(device=param.device, dtype=param.dtype)
        emb = rec(crops)
        if rec.normalize_output:
            emb = torch.nn.functional.normalize(emb, dim=1)
        return emb.to(images.device)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pairwise_distance(a, b, self.metric)

    def same_identity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(a, b) < self.threshold
