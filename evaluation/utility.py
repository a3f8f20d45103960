"""Face utility of protected images (paper A.3.2, Table 4): is the face still detected, and do
its box and landmarks stay where they were?

Distances are in pixels of the original image: the box distance is the mean Euclidean distance
of the two corners (x1, y1), (x2, y2); the landmark distance is the mean Euclidean distance of
corresponding landmarks (68 dlib points for dlib, the 5 contract points otherwise).
"""
from __future__ import annotations

import torch

from .analysis import FaceAnalysis


def box_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x1, y1 = torch.maximum(a[0], b[0]), torch.maximum(a[1], b[1])
    x2, y2 = torch.minimum(a[2], b[2]), torch.minimum(a[3], b[3])
    inter = float((x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0))
    area = lambda t: float((t[2] - t[0]).clamp_min(0) * (t[3] - t[1]).clamp_min(0))  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def match_face(box: torch.Tensor, candidates: list[torch.Tensor], min_iou: float = 0.3) -> int | None:
    """Index of the candidate box overlapping ``box`` most (IoU >= ``min_iou``), else None."""
    best, best_iou = None, min_iou
    for i, c in enumerate(candidates):
        iou = box_iou(box.float(), c.float())
        if iou >= best_iou:
            best, best_iou = i, iou
    return best


def box_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean corner distance (pixels) between two (4,) boxes."""
    return float((a.view(2, 2).double() - b.view(2, 2).double()).norm(dim=1).mean())


def landmark_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean point distance (pixels) between two (N, 2) landmark sets."""
    if a.shape != b.shape:
        raise ValueError(f"landmark sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).norm(dim=1).mean())


def utility_pair(original: FaceAnalysis, protected: FaceAnalysis) -> dict:
    """Detection and geometry of the largest original face in the protected image.

    Returns n_faces_original, n_faces_protected, detected (the original's largest face has a
    matching face in the protected image, IoU >= 0.3), box_distance and landmark_distance
    (None when not detected or when the original has no face).
    """
    out = {"n_faces_original": original.n_faces, "n_faces_protected": protected.n_faces, "detected": None,
           "box_distance": None, "landmark_distance": None}
    if not original.detected:
        return out
    j = match_face(original.boxes[0], protected.boxes)
    out["detected"] = j is not None
    if j is not None:
        out["box_distance"] = box_distance(original.boxes[0], protected.boxes[j])
        out["landmark_distance"] = landmark_distance(original.points[0], protected.points[j])
    return out
