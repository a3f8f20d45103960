"""MTCNN face detector (P-Net, R-Net, O-Net cascade) with 5 landmarks, in plain torch.

The three networks use facenet-pytorch's parameter names, so the state dicts that ship in
its wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``) load with ``weights_only=True``.
The cascade follows facenet-pytorch's ``detect_face`` (itself a port of Zhang et al.'s
MATLAB code, including its 1-based box conventions), with a small greedy NMS written here
because torch has no NMS op without torchvision.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Detector, Face


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def raw(self, x):
        """(box regression, face/background class scores before the softmax): the detector hiding attacks these."""
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))))
        return self.conv4_2(x), self.conv4_1(x)

    def forward(self, x):
        reg, scores = self.raw(x)
        return reg, F.softmax(scores, dim=1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def raw(self, x):
        """(box regression, class scores before the softmax)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the weights were converted from Caffe: flatten in (W, H, C) order
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense5_2(x), self.dense5_1(x)

    def forward(self, x):
        reg, scores = self.raw(x)
        return reg, F.softmax(scores, dim=1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def raw(self, x):
        """(box regression, landmarks, class scores before the softmax)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x)

    def forward(self, x):
        reg, landmarks, scores = self.raw(x)
        return reg, landmarks, F.softmax(scores, dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, method: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    ``method``: "union" (IoU) or "min" (intersection over the smaller box). Boxes use MTCNN's
    inclusive pixel convention (width = x2 - x1 + 1).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp_min(0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp_min(0)
        inter = w * h
        if method == "min":
            overlap = inter / torch.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return torch.stack(keep)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow boxes to squares around their centres (MTCNN's ``rerec``)."""
    boxes = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    boxes = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, 0] += reg[:, 0] * w
    boxes[:, 1] += reg[:, 1] * h
    boxes[:, 2] += reg[:, 2] * w
    boxes[:, 3] += reg[:, 3] * h
    return boxes


def _crops(img: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampled ``size`` crops of the (1, 3, H, W) image at the boxes; also which boxes were valid."""
    h, w = img.shape[2:]
    b = boxes[:, :4].trunc().int().tolist()
    out, valid = [], []
    for k, (x1, y1, x2, y2) in enumerate(b):
        x1, y1, x2, y2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        if y2 > y1 - 1 and x2 > x1 - 1:
            out.append(F.interpolate(img[:, :, y1 - 1:y2, x1 - 1:x2], size=(size, size), mode="area"))
            valid.append(k)
    if not out:
        return img.new_zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return torch.cat(out), torch.tensor(valid, dtype=torch.long)


class MTCNN(Detector):
    """The cascade. ``detect`` returns every face in one (H, W, 3) [0, 1] image, largest first."""

    name = "mtcnn"

    def __init__(self, pnet: PNet, rnet: RNet, onet: ONet, min_face_size: int = 20,
                 thresholds=(0.6, 0.7, 0.7), factor: float = 0.709, min_score: float = 0.9,
                 max_side: int = 1024):
        self.pnet, self.rnet, self.onet = (m.eval().requires_grad_(False) for m in (pnet, rnet, onet))
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        # O-Net's own 0.7 lets through blurry non-faces in crowded photos; 0.9 keeps real faces
        # (all faces of the test photos score >= 0.97) and drops them.
        self.min_score = min_score
        # Large photos are analysed at most this big (faces stay far above min_face_size); boxes
        # and landmarks are mapped back to full resolution. Keeps a 12 MP photo under a second.
        self.max_side = max_side

    def to(self, device):
        for m in (self.pnet, self.rnet, self.onet):
            m.to(device)
        return self

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[Face]:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"MTCNN expects one (H, W, 3) RGB image, got shape {tuple(image.shape)}")
        device = next(self.pnet.parameters()).device
        img = (image.detach().to(device=device, dtype=torch.float32) * 255.0).permute(2, 0, 1).unsqueeze(0)
        shrink = max(img.shape[2:]) / self.max_side if self.max_side else 0.0
        if shrink > 1.0:
            size = (max(1, round(img.shape[2] / shrink)), max(1, round(img.shape[3] / shrink)))
            img = F.interpolate(img, size=size, mode="area")
        h, w = img.shape[2:]
        norm = lambda t: (t - 127.5) * 0.0078125  # noqa: E731

        # Stage 1: P-Net over an image pyramid.
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales, s = [], m
        while minl >= 12:
            scales.append(s)
            s *= self.factor
            minl *= self.factor
        cands = []
        for scale in scales:
            im = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, prob = self.pnet(norm(im))
            score = prob[0, 1]
            ys, xs = torch.nonzero(score >= self.thresholds[0], as_tuple=True)
            if ys.numel() == 0:
                continue
            pos = torch.stack([xs, ys], dim=1).to(img.dtype)
            q1 = ((2 * pos + 1) / scale).floor()
            q2 = ((2 * pos + 12) / scale).floor()
            b = torch.cat([q1, q2, score[ys, xs, None], reg[0, :, ys, xs].T], dim=1)
            cands.append(b[nms(b[:, :4], b[:, 4], 0.5)])
        if not cands:
            return []
        boxes = torch.cat(cands)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        wh = (boxes[:, 2:4] - boxes[:, 0:2])
        boxes = torch.cat([boxes[:, 0:2] + boxes[:, 5:7] * wh, boxes[:, 2:4] + boxes[:, 7:9] * wh,
                           boxes[:, 4:5]], dim=1)
        boxes = _square(boxes)

        # Stage 2: R-Net refines and rejects.
        crops, valid = _crops(img, boxes, 24)
        if valid.numel() == 0:
            return []
        boxes = boxes[valid]
        reg, prob = self.rnet(norm(crops))
        keep = prob[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        reg = reg[keep]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        if boxes.numel() == 0:
            return []

        # Stage 3: O-Net gives final boxes and the 5 landmarks.
        crops, valid = _crops(img, boxes, 48)
        if valid.numel() == 0:
            return []
        boxes = boxes[valid]
        reg, pts, prob = self.onet(norm(crops))
        keep = prob[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        reg, pts = reg[keep], pts[keep]
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * pts[:, 5:10] + boxes[:, 1:2] - 1
        points = torch.stack([px, py], dim=2)                  # (N, 5, 2)
        boxes = _regress(boxes, reg)
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7, method="min")
        boxes, points = boxes[pick], points[pick]
        keep = boxes[:, 4] >= self.min_score
        boxes, points = boxes[keep], points[keep]
        if shrink > 1.0:  # pixel centres: x_full = (x + 0.5) * s - 0.5
            sy, sx = image.shape[0] / h, image.shape[1] / w
            scale = torch.tensor([sx, sy], dtype=boxes.dtype, device=boxes.device)
            boxes = torch.cat([((boxes[:, :4].view(-1, 2, 2) + 0.5) * scale - 0.5).view(-1, 4), boxes[:, 4:]], 1)
            points = (points + 0.5) * scale - 0.5

        faces = [Face(box=b[:4].float().cpu(), landmarks=p.float().cpu(), score=float(b[4]))
                 for b, p in zip(boxes, points)]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


def facenet_pytorch_weights_dir() -> Path | None:
    """``facenet_pytorch/data`` of an installed facenet-pytorch wheel, found without importing it."""
    spec = importlib.util.find_spec("facenet_pytorch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "data"
        if (p / "pnet.pt").is_file():
            return p
    return None


def load_mtcnn(weights_dir: str | Path) -> MTCNN:
    """MTCNN from ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (or ``.safetensors``) in ``weights_dir``."""
    weights_dir = Path(weights_dir)
    nets = []
    for stem, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        st, pt = weights_dir / f"{stem}.safetensors", weights_dir / f"{stem}.pt"
        if st.is_file() or pt.is_file():
            from ..weights import read_tensor_file
            sd = read_tensor_file(st if st.is_file() else pt, "MTCNN's weights ship in the facenet-pytorch wheel.")
        else:
            raise FileNotFoundError(f"MTCNN weights {stem}.pt are missing from {weights_dir}; they ship in the "
                                    f"facenet-pytorch wheel: pip install --no-deps facenet-pytorch")
        net = cls()
        sd = {k: v for k, v in sd.items() if k in net.state_dict()}  # drop nothing-shaped extras
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"{stem} weights in {weights_dir} do not fit MTCNN's {cls.__name__}: {e}") from e
        nets.append(net)
    return MTCNN(*nets)
