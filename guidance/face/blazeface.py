"""MediaPipe BlazeFace (short and full range) in torch, from MediaPipe's own ``.tflite`` files.

The network is the file's graph run by ``tflite.py``; what surrounds it follows MediaPipe's face
detection graphs (``face_detection_{short,full}_range_common.pbtxt``):

* **Input**: the whole photo letterboxed to a square (black borders, the photo centred), resized to the
  model's side (128 short range, 192 full range; bilinear, antialiased when shrinking) and mapped to
  [-1, 1]. Done in torch, differentiably, from the full-resolution photo, so an attack reaches every
  pixel at this detector's own input scale.
* **Anchors** (SSD anchor calculator, ``fixed_anchor_size``): one centre per feature-map cell,
  ``((x + 0.5) / fw, (y + 0.5) / fh)``; short range: strides 8, 16, 16, 16 with two anchors per layer
  (interpolated aspect ratio 1.0) -> 16x16x2 + 8x8x6 = 896; full range: stride 4, one anchor per cell
  -> 48x48 = 2304.
* **Decoding** (tensors-to-detections): each anchor's 16 values are x-centre, y-centre, width, height
  and six keypoints (x, y), in input pixels: centre = anchor + value / side, size = value / side
  (anchor size fixed at 1). Score = sigmoid of the logit clipped to [-100, 100]; kept at >= 0.5 (short)
  or >= 0.6 (full range).
* **Non-maximum suppression**, MediaPipe's WEIGHTED algorithm: detections sorted by score; the best
  one and every remaining detection overlapping it by IoU > 0.3 are merged into one whose box and
  keypoints are their score-weighted mean and whose score is the best one's; repeat on the rest.

Keypoints are, in MediaPipe's order, the two eyes, nose tip, mouth centre and two ear tragions. The
pack's five landmarks (left eye, right eye, nose, left and right mouth corner; "left" = smaller x) take
the eyes and nose as they are; BlazeFace has no mouth corners, so they are placed on the mouth centre
+- 0.415 x the eye-to-eye vector (the ratio of ArcFace's template), which is enough for alignment.

BlazeFace looks at the whole photo at 128 or 192 pixels: it is built for faces that fill a good part
of the frame (selfies, video calls; full range for faces up to ~5 m away). In a group photo of many
small faces it finds few of them: that is the detector as phones and browsers run it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .anchors import AnchorScores, AttackTarget, box_iou
from .base import Detector, Face
from .tflite import TFLiteModule

# variant -> (file, input side, strides, anchors per cell of a same-stride group added per layer, min score)
VARIANTS = {
    "short": ("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2, 0.5),
    "full": ("face_detection_full_range.tflite", 192, (4,), 1, 0.6),
}
NMS_IOU = 0.3
SCORE_CLIP = 100.0
ACTIVE_LOGITS = 2.0    # the attack reads anchors whose logit is at most this far below the threshold's
MOUTH_CORNER = 0.415   # ArcFace template: mouth width / eye distance = 29.2 / 35.2, halved


def ssd_anchors(side: int, strides, per_layer: int) -> torch.Tensor:
    """(N, 2) anchor centres in [0, 1], MediaPipe's order (layer groups of equal stride, rows, columns, anchors)."""
    out, i = [], 0
    while i < len(strides):
        j, repeats = i, 0
        while j < len(strides) and strides[j] == strides[i]:
            repeats += per_layer
            j += 1
        n = side // strides[i]
        c = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
        out.append(grid.repeat_interleave(repeats, 0))
        i = j
    return torch.cat(out)


def weighted_nms(boxes: torch.Tensor, points: torch.Tensor, scores: torch.Tensor, iou: float = NMS_IOU):
    """MediaPipe's WEIGHTED non-maximum suppression -> (boxes (K, 4), points (K, P, 2), scores (K,))."""
    order = scores.argsort(descending=True)
    remaining = order.tolist()
    kb, kp, ks = [], [], []
    while remaining:
        top = remaining[0]
        ov = box_iou(boxes[top:top + 1], boxes[remaining])[0]
        members = [r for r, o in zip(remaining, ov.tolist()) if o > iou or r == top]
        w = scores[members]
        kb.append((boxes[members] * w[:, None]).sum(0) / w.sum())
        kp.append((points[members] * w[:, None, None]).sum(0) / w.sum())
        ks.append(scores[top])
        remaining = [r for r in remaining if r not in set(members)]
    if not kb:
        return boxes[:0], points[:0], scores[:0]
    return torch.stack(kb), torch.stack(kp), torch.stack(ks)


def five_points(kp: torch.Tensor) -> torch.Tensor:
    """(6, 2) BlazeFace keypoints -> (5, 2) in the pack's order (eyes and mouth corners by x)."""
    eyes = kp[:2][kp[:2, 0].argsort()]
    across = eyes[1] - eyes[0]
    mouth = kp[3]
    return torch.stack([eyes[0], eyes[1], kp[2], mouth - MOUTH_CORNER * across, mouth + MOUTH_CORNER * across])


class BlazeFace(Detector, AttackTarget):
    """A BlazeFace variant: ``detect`` (MediaPipe's verdict) and ``anchor_scores`` (its logits, differentiable)."""

    def __init__(self, net: TFLiteModule, variant: str = "short", min_score: float | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown BlazeFace variant {variant!r}; choose one of {tuple(VARIANTS)}")
        _, side, strides, per_layer, default_score = VARIANTS[variant]
        if tuple(net.input_shape) != (1, side, side, 3):
            raise ValueError(f"{net.path} has input {net.input_shape}, not BlazeFace {variant} range's "
                             f"(1, {side}, {side}, 3): is it the right file ({VARIANTS[variant][0]})?")
        self.net = net.eval().requires_grad_(False)
        self.variant, self.side = variant, side
        self.name = f"blazeface-{variant}"
        self.min_score = float(default_score if min_score is None else min_score)
        self.anchors = ssd_anchors(side, strides, per_layer)
        n_out = net.shapes[net.outputs[0]]
        if n_out[1] != self.anchors.shape[0]:
            raise ValueError(f"{net.path}: {n_out[1]} boxes but {self.anchors.shape[0]} anchors for {variant} range")
        # smallest face found: about a tenth of the photo's long side (the letterboxed input is side px)
        self.min_face = 0
        self.min_face_text = f"about 1/10 of the photo's long side ({variant} range looks at it at {side} px)"

    def modules(self):
        return [self.net]

    def memory_bytes(self, h: int, w: int) -> int:
        return int(8 * 3 * h * w * 4 + 64 * 2 ** 20)

    def _letterbox(self, x255: torch.Tensor):
        """(1, 3, H, W) [0, 255] -> (NHWC model input in [-1, 1], side of the padded square, pad x, pad y)."""
        h, w = x255.shape[2:]
        sq = max(h, w)
        px, py = (sq - w) // 2, (sq - h) // 2
        x = F.pad(x255, (px, sq - w - px, py, sq - h - py))
        x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False,
                          antialias=sq > self.side)
        return (x / 127.5 - 1.0).permute(0, 2, 3, 1), sq, px, py

    def _run(self, x255: torch.Tensor):
        """-> boxes (N, 4) and keypoints (N, 6, 2) in full-image pixels (no gradient), logits (N,)."""
        device = next(iter(self.net.buffers())).device
        x, sq, px, py = self._letterbox(x255.to(device=device, dtype=torch.float32))
        raw, logits = self.net(x)
        boxes, pts = self.decode(raw[0].detach(), sq, px, py)
        return boxes, pts, logits[0, :, 0]

    def decode(self, raw: torch.Tensor, sq: float, px: float, py: float):
        """(N, 16) raw regressors -> boxes (N, 4), keypoints (N, 6, 2) in pixels of a photo letterboxed into a
        square of side ``sq`` with ``px``, ``py`` pixels of border left and top."""
        a = self.anchors.to(raw.device)
        r = raw.float().view(-1, 8, 2) / self.side
        centre = a + r[:, 0]
        half = r[:, 1] / 2
        boxes = torch.cat([centre - half, centre + half], 1)
        pts = a[:, None, :] + r[:, 2:]
        off = torch.tensor([px, py], device=raw.device, dtype=torch.float32)
        return (boxes.view(-1, 2, 2) * sq - off).view(-1, 4), pts * sq - off

    def faces(self, boxes: torch.Tensor, pts: torch.Tensor, logits: torch.Tensor) -> list[Face]:
        """Decoded anchors -> MediaPipe's detections (score threshold, valid boxes, weighted NMS), largest first."""
        scores = torch.sigmoid(logits.float().clamp(-SCORE_CLIP, SCORE_CLIP))
        keep = (scores >= self.min_score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        b, p, s = weighted_nms(boxes[keep].cpu(), pts[keep].cpu(), scores[keep].cpu())
        faces = [Face(box=b[i], landmarks=five_points(p[i]), score=float(s[i])) for i in range(len(s))]
        for f, kp in zip(faces, p):
            f.keypoints = kp          # MediaPipe's six keypoints (eyes, nose, mouth, ears)
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[Face]:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"BlazeFace expects one (H, W, 3) RGB image, got shape {tuple(image.shape)}")
        boxes, pts, logits = self._run(image.float().permute(2, 0, 1).unsqueeze(0) * 255.0)
        return self.faces(boxes, pts, logits)

    def anchor_scores(self, x255: torch.Tensor, focus=None) -> list[AnchorScores]:
        """The anchors whose logit is within ``ACTIVE_LOGITS`` of the threshold's: of the ~170 anchors that overlap
        a portrait's face, the many far below it otherwise outvote, in the sign of the summed gradient, the few
        that fire (measured: the top anchor's logit did not fall in 30 steps at R_p 8; with the cut, the face hid
        in 25). Anchors left out are far from firing; if one climbs back it is in the next step's loss again."""
        boxes, _, logits = self._run(x255)
        zt = math.log(self.min_score / (1 - self.min_score))
        keep = logits.detach() > zt - ACTIVE_LOGITS
        return [AnchorScores(self.name, boxes[keep].cpu(), logits[keep], self.min_score)]


def load_blazeface(path: str | Path, variant: str, device="cpu") -> BlazeFace:
    """BlazeFace from MediaPipe's ``face_detection_{short,full}_range.tflite``."""
    return BlazeFace(TFLiteModule(path), variant).to(device)
