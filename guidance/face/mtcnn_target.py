"""MTCNN as an attack target: the cascade of ``mtcnn.py`` run with gradients to every classifier.

A face survives MTCNN only if a chain survives all three stages: a P-Net window (12x12 at some
pyramid scale) scores >= 0.6, its regressed square box passes R-Net (> 0.7), and that box passes
O-Net (> 0.7, and the pack keeps O-Net scores >= 0.9). Breaking any link of every chain hides the
face, so the attack reads all three classifiers:

* **P-Net over the whole pyramid**: every window at every scale is an anchor. This is where
  proposals die first (arXiv 1910.06261): a face with no P-Net window above 0.6 never reaches the
  later stages, whatever they would say.
* **R-Net and O-Net on the proposals of the current image**: which boxes reach them is decided
  without gradients, exactly as ``MTCNN.detect`` decides (thresholds, NMS, regression); their
  crops are then cut from the image differentiably (area resampling is linear in the pixels).

Large photos are analysed at most ``max_side`` pixels wide, as ``MTCNN.detect`` does; the area
downsampling is differentiable, so gradients reach every full-resolution pixel, and anchor boxes
are mapped back to full-resolution pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .anchors import AnchorScores, AttackTarget, box_iou
from .base import Face
from .mtcnn import MTCNN, _crops, _regress, _square, nms


def _norm(t: torch.Tensor) -> torch.Tensor:
    return (t - 127.5) * 0.0078125


# The nets' own forward passes end in a softmax, whose face probability saturates at 1.0 in float32
# on clear faces (and then has no gradient). These return the face-minus-background logit instead.
def _face_logit(net, x):
    """A stage's box regression and face logit log p(face) - log p(background) (what its softmax turns into p)."""
    out = net.raw(x)
    return out[0], out[-1][:, 1] - out[-1][:, 0]


def _roi_crops(img: torch.Tensor, boxes: torch.Tensor, size: int):
    """``mtcnn._crops`` cut from one slice of the image around all boxes.

    Same pixels as ``_crops(img, boxes, size)``, but autograd keeps one region-sized gradient per crop
    instead of a full-image one (hundreds of crops x a full image were most of an iteration's time).
    Boxes are shifted by whole pixels, which leaves ``_crops``' truncation and 1-based clipping unchanged.
    """
    if boxes.shape[0] == 0:
        return img.new_zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    h, w = img.shape[2:]
    b = boxes[:, :4].trunc()
    x0 = max(int(b[:, 0].min()), 1) - 1
    y0 = max(int(b[:, 1].min()), 1) - 1
    x1 = min(max(int(b[:, 2].max()), 1), w)
    y1 = min(max(int(b[:, 3].max()), 1), h)
    if x1 <= x0 or y1 <= y0:
        return _crops(img, boxes, size)
    shifted = boxes.clone()
    shifted[:, [0, 2]] -= x0
    shifted[:, [1, 3]] -= y0
    return _crops(img[:, :, y0:y1, x0:x1], shifted, size)


class MTCNNTarget(AttackTarget):
    def __init__(self, mtcnn: MTCNN, stages: tuple[str, ...] = ("pnet", "rnet", "onet")):
        self.mtcnn = mtcnn
        self.stages = stages  # which classifiers the loss reads (all three decide; see the module doc)
        self.name = "mtcnn"
        self.min_face = mtcnn.min_face_size

    def detect(self, image: torch.Tensor) -> list[Face]:
        return self.mtcnn.detect(image)

    def modules(self):
        return [self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet]

    def memory_bytes(self, h: int, w: int) -> int:
        # full-resolution image, gradient and perturbation (a few float copies), plus the pyramid at
        # <= max_side with P-Net's activations kept for backward (~ 10+16+32 channels, x 1/(1 - 0.709^2))
        side = max(h, w)
        s = min(1.0, self.mtcnn.max_side / side) if self.mtcnn.max_side else 1.0
        analysed = h * w * s * s
        pyramid = analysed * (12.0 / self.mtcnn.min_face_size) ** 2 / (1 - self.mtcnn.factor ** 2)
        return int(8 * 3 * h * w * 4 + pyramid * 70 * 4 * 2)

    def anchor_scores(self, x255: torch.Tensor, focus=None) -> list[AnchorScores]:
        m = self.mtcnn
        device = next(m.pnet.parameters()).device
        img = x255.to(device=device, dtype=torch.float32)
        full_h, full_w = img.shape[2:]
        shrink = max(full_h, full_w) / m.max_side if m.max_side else 0.0
        if shrink > 1.0:
            img = F.interpolate(img, size=(max(1, round(full_h / shrink)), max(1, round(full_w / shrink))),
                                mode="area")
        h, w = img.shape[2:]
        sx, sy = full_w / w, full_h / h

        def to_full(b: torch.Tensor) -> torch.Tensor:  # analysed pixels -> full-resolution pixels
            return ((b.detach().view(-1, 2, 2) + 0.5) * torch.tensor([sx, sy], device=b.device) - 0.5).view(-1, 4)

        out: list[AnchorScores] = []
        # Stage 1: P-Net over the pyramid (same scales as MTCNN.detect).
        scale, minl = 12.0 / m.min_face_size, min(h, w) * 12.0 / m.min_face_size
        cands = []
        # A 12/scale window overlaps a face of side a by IoU > 0.15 only if its side lies within
        # [0.38 a, 2.6 a]: other levels can neither produce nor keep the faces we care about.
        focus_a = None
        lo, hi = 0.0, float("inf")
        if focus is not None and focus.numel():
            focus_a = ((focus.to(device).float().view(-1, 2, 2) + 0.5) / torch.tensor([sx, sy], device=device)
                       - 0.5).view(-1, 4)
            sides = focus_a[:, 2:] - focus_a[:, :2]
            lo, hi = float(sides.min()) * 0.35, float(sides.max()) * 2.9
        while minl >= 12:
            if not lo <= 12.0 / scale <= hi:
                scale *= m.factor
                minl *= m.factor
                continue
            im = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, logit = _face_logit(m.pnet, _norm(im))
            logit = logit[0]
            score = torch.sigmoid(logit.detach())
            ys, xs = torch.meshgrid(torch.arange(score.shape[0], device=device),
                                    torch.arange(score.shape[1], device=device), indexing="ij")
            pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()
            windows = torch.cat([((2 * pos + 1) / scale).floor(), ((2 * pos + 12) / scale).floor()], 1)
            if "pnet" in self.stages:
                out.append(AnchorScores(f"mtcnn/pnet@{scale:.3f}", to_full(windows), logit.reshape(-1),
                                        m.thresholds[0], decides=False))
            flat = score.detach().reshape(-1)
            keep = flat >= m.thresholds[0]
            if keep.any():
                b = torch.cat([windows[keep], flat[keep, None], reg[0].detach().reshape(4, -1).T[keep]], 1)
                cands.append(b[nms(b[:, :4], b[:, 4], 0.5)])
            scale *= m.factor
            minl *= m.factor
        if not cands:
            return out
        boxes = torch.cat(cands)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        boxes = _square(torch.cat([boxes[:, 0:2] + boxes[:, 5:7] * wh, boxes[:, 2:4] + boxes[:, 7:9] * wh,
                                   boxes[:, 4:5]], 1))

        # Proposals far from the focus faces neither become them nor suppress them (NMS needs overlap):
        # leave them out, so only a few dozen crops carry gradients.
        if focus_a is not None:
            boxes = boxes[box_iou(boxes[:, :4], focus_a).max(1).values > 0.05]

        # Stage 2: R-Net on the proposals, crops cut with gradients.
        crops, valid = _roi_crops(img, boxes, 24)
        if valid.numel() == 0:
            return out
        boxes = boxes[valid.to(device)]
        reg, logit = _face_logit(m.rnet, _norm(crops))
        if "rnet" in self.stages:
            out.append(AnchorScores("mtcnn/rnet", to_full(boxes[:, :4]), logit, m.thresholds[1], decides=False))
        p = torch.sigmoid(logit.detach())
        keep = p > m.thresholds[1]
        boxes = torch.cat([boxes[keep, :4], p[keep, None]], 1)
        reg = reg.detach()[keep]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        if boxes.numel() == 0:
            return out

        # Stage 3: O-Net; a face is reported at O-Net >= min_score (0.9), the stricter of its two thresholds.
        crops, valid = _roi_crops(img, boxes, 48)
        if valid.numel() == 0:
            return out
        boxes = boxes[valid.to(device)]
        reg, logit = _face_logit(m.onet, _norm(crops))
        final = _regress(torch.cat([boxes[:, :4], torch.sigmoid(logit.detach())[:, None]], 1), reg.detach())
        out.append(AnchorScores("mtcnn/onet", to_full(final[:, :4]), logit,
                                max(m.thresholds[2], m.min_score)))
        return out
