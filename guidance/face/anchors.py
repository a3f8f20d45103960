"""What a detector exposes to be attacked: differentiable per-anchor face probabilities.

Every detector the pack attacks (MTCNN, RetinaFace, SCRFD) ends in a classifier that says, for
each anchor (a window, a prior box, a candidate crop), how likely it holds a face; a face is
reported when some anchor's probability passes the detector's threshold and survives NMS. An
:class:`AnchorScores` is one such classifier's output over one image: the anchors' boxes (in
pixels of the full image, detached: they only say *where* the anchor looks) and their face
probabilities (differentiable with respect to the image).

An :class:`AttackTarget` is a detector that gives both its ordinary ``detect`` (the verdict we
measure, on the image as it will be saved) and ``anchor_scores`` (what the attack's loss reads).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from .base import Face

HIDDEN_IOU = 0.3            # a private face is found again if a detection overlaps it this much (strict)
KEPT_IOU = 0.5              # a kept face is still detected if a detection overlaps it this much


@dataclass
class AnchorScores:
    name: str                # e.g. "mtcnn/pnet@0.35" (which classifier, for logs)
    boxes: torch.Tensor      # (N, 4) x1, y1, x2, y2 in full-image pixels, no gradient
    logits: torch.Tensor     # (N,) face logit (p = sigmoid), differentiable w.r.t. the image
    threshold: float         # the detector's own acceptance threshold (a probability) for this classifier
    decides: bool = True     # an anchor of this classifier above threshold is a detection (False: an early
                             # cascade stage such as MTCNN's P-Net / R-Net, whose proposals a later stage judges)


class AttackTarget(abc.ABC):
    """A face detector that can be attacked: ``detect`` (its verdict) and ``anchor_scores`` (its gradients)."""

    name: str = "target"
    min_face: int = 20       # smallest face side (pixels) the detector reports, for error messages

    @abc.abstractmethod
    def detect(self, image: torch.Tensor) -> list[Face]:
        """All faces of one (H, W, 3) [0, 1] image, largest first (no gradient)."""

    @abc.abstractmethod
    def anchor_scores(self, x255: torch.Tensor, focus: torch.Tensor | None = None) -> list[AnchorScores]:
        """Per-anchor face logits of one (1, 3, H, W) RGB image in [0, 255], differentiable.

        ``focus``: (K, 4) boxes (full-image pixels) of the faces the caller cares about; a detector may
        skip anchors that cannot overlap them (MTCNN skips pyramid levels and far proposals), to save time.
        """

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules holding the weights (to move or thaw them)."""
        return []

    def to(self, device) -> "AttackTarget":
        """Move the weights (:meth:`modules`) to ``device``."""
        for module in self.modules():
            module.to(device)
        return self

    def memory_bytes(self, h: int, w: int) -> int:
        """A rough upper bound of the memory one attack iteration needs on an (h, w) image."""
        return 64 * h * w * 4


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) boxes -> (N, M) intersection over union (continuous coordinates)."""
    a, b = a.float(), b.float()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


def face_boxes(faces: list[Face]) -> torch.Tensor:
    return torch.stack([f.box.float() for f in faces]) if faces else torch.zeros(0, 4)


def match_faces(reference: torch.Tensor, found: list[Face], iou: float) -> list[bool]:
    """Per reference box: is there a detection overlapping it by at least ``iou``?"""
    if reference.numel() == 0:
        return []
    if not found:
        return [False] * reference.shape[0]
    return (box_iou(reference, face_boxes(found)).max(1).values >= iou).tolist()
