"""RetinaFace (ResNet-50) in plain torch, reading facexlib's ``detection_Resnet50_Final.pth``.

The layout is facexlib's (itself biubug6/Pytorch_Retinaface's): ``body`` is torchvision's ResNet-50
up to ``layer4`` (IntermediateLayerGetter keeps the names ``conv1``, ``bn1``, ``layer1..4``), then
``fpn`` (``output1..3`` 1x1 conv-BN-ReLU laterals, ``merge1..2`` 3x3 conv-BN-ReLU), three ``ssh``
context modules and per-level ``ClassHead`` / ``BboxHead`` / ``LandmarkHead`` 1x1 convs with two
anchors per cell. The file is read with ``weights_only=True``; a ``module.`` prefix (DataParallel
checkpoints) is stripped as facexlib does.

Detection follows facexlib's ``detect_faces``: BGR input minus the mean (104, 117, 123), no scaling;
priors per level (strides 8, 16, 32; sizes 16/32, 64/128, 256/512 pixels) centred at
``(j + 0.5) * stride``; boxes decoded with variances (0.1, 0.2); score = softmax face probability,
kept above ``score_threshold`` (0.8, facexlib's default) and NMS at 0.4. Photos larger than
``max_side`` are analysed at that size (area downsampling, differentiable) and mapped back.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import AnchorScores, AttackTarget
from .base import Detector, Face
from .mtcnn import nms

FILENAME = "detection_Resnet50_Final.pth"
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3 conv), same parameter names."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Body(nn.Module):
    """ResNet-50 without its classifier; returns layer2, layer3, layer4 (strides 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, down)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return c2, c3, self.layer4(c3)


def _conv_bn(inp, oup, k=3, relu=True):
    layers = [nn.Conv2d(inp, oup, k, 1, k // 2, bias=False), nn.BatchNorm2d(oup)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class FPN(nn.Module):
    def __init__(self, in_channels=(512, 1024, 2048), out=256):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, out, 1) for c in in_channels)
        self.merge1, self.merge2 = _conv_bn(out, out), _conv_bn(out, out)

    def forward(self, c2, c3, c4):
        o1, o2, o3 = self.output1(c2), self.output2(c3), self.output3(c4)
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return o1, o2, o3


class SSH(nn.Module):
    def __init__(self, c=256):
        super().__init__()
        self.conv3X3 = _conv_bn(c, c // 2, relu=False)
        self.conv5X5_1 = _conv_bn(c, c // 4)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, relu=False)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, relu=False)

    def forward(self, x):
        a = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(a), self.conv7x7_3(self.conv7X7_2(a))], 1))


class _Head(nn.Module):
    def __init__(self, c: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c, anchors * per_anchor, 1)

    def forward(self, x):
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFaceNet(nn.Module):
    """Returns per-anchor (box regressions (B, N, 4), class logits (B, N, 2), landmark regressions (B, N, 10))."""

    def __init__(self):
        super().__init__()
        self.body = ResNet50Body()
        self.fpn = FPN()
        self.ssh1, self.ssh2, self.ssh3 = SSH(), SSH(), SSH()
        self.ClassHead = nn.ModuleList(_Head(256, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(256, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(256, 10) for _ in range(3))

    def forward(self, x):
        feats = [s(f) for s, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(*self.body(x)))]
        return (torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1),
                torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1),
                torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1))


def priors(h: int, w: int, device=None) -> torch.Tensor:
    """(N, 4) prior boxes (cx, cy, s_x, s_y) in pixels, in the heads' order (level, row, column, size)."""
    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        fh, fw = -(-h // step), -(-w // step)
        for i, j in itertools.product(range(fh), range(fw)):
            for s in sizes:
                out.append(((j + 0.5) * step, (i + 0.5) * step, s, s))
    return torch.tensor(out, dtype=torch.float32, device=device)


def decode(loc: torch.Tensor, pri: torch.Tensor) -> torch.Tensor:
    """SSD box decoding with RetinaFace's variances -> (N, 4) x1, y1, x2, y2 pixels."""
    c = pri[:, :2] + loc[:, :2] * VARIANCE[0] * pri[:, 2:]
    s = pri[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    return torch.cat([c - s / 2, c + s / 2], 1)


class RetinaFace(Detector, AttackTarget):
    """The detector (``detect``) and its attack interface (``anchor_scores``)."""

    name = "retinaface"
    min_face = 16

    def __init__(self, net: RetinaFaceNet, score_threshold: float = 0.8, nms_threshold: float = 0.4,
                 max_side: int = 1024):
        self.net = net.eval().requires_grad_(False)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        self._priors: dict = {}

    def modules(self):
        return [self.net]

    def memory_bytes(self, h: int, w: int) -> int:
        side = max(h, w)
        s = min(1.0, self.max_side / side) if self.max_side else 1.0
        # ResNet-50 + FPN + SSH activations kept for backward: ~ 2.5 KB per analysed pixel in float32
        return int(8 * 3 * h * w * 4 + h * w * s * s * 2500)

    def _run(self, x255: torch.Tensor):
        """(1, 3, H, W) RGB [0, 255] -> (boxes (N, 4) full-res pixels, logits (N,), landmarks (N, 5, 2))."""
        device = next(self.net.parameters()).device
        x = x255.to(device=device, dtype=torch.float32)
        full_h, full_w = x.shape[2:]
        shrink = max(full_h, full_w) / self.max_side if self.max_side else 0.0
        if shrink > 1.0:
            x = F.interpolate(x, size=(max(1, round(full_h / shrink)), max(1, round(full_w / shrink))), mode="area")
        h, w = x.shape[2:]
        bgr = x.flip(1) - torch.tensor(MEAN_BGR, device=device).view(1, 3, 1, 1)
        loc, conf, landm = self.net(bgr)
        key = (h, w, str(device))
        if key not in self._priors:
            self._priors = {key: priors(h, w, device)}
        pri = self._priors[key]
        boxes = decode(loc[0].detach(), pri)
        pts = (pri[:, None, :2] + landm[0].detach().view(-1, 5, 2) * VARIANCE[0] * pri[:, None, 2:])
        scale = torch.tensor([full_w / w, full_h / h], device=device)
        boxes = ((boxes.view(-1, 2, 2) + 0.5) * scale - 0.5).view(-1, 4)
        pts = (pts + 0.5) * scale - 0.5
        return boxes, conf[0, :, 1] - conf[0, :, 0], pts

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[Face]:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"RetinaFace expects one (H, W, 3) RGB image, got shape {tuple(image.shape)}")
        boxes, logits, pts = self._run(image.float().permute(2, 0, 1).unsqueeze(0) * 255.0)
        scores = torch.sigmoid(logits)   # = softmax over (background, face)
        keep = scores > self.score_threshold
        boxes, scores, pts = boxes[keep].cpu(), scores[keep].cpu(), pts[keep].cpu()
        pick = nms(boxes, scores, self.nms_threshold)
        faces = [Face(box=boxes[i], landmarks=pts[i], score=float(scores[i])) for i in pick.tolist()]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def anchor_scores(self, x255: torch.Tensor, focus=None) -> list[AnchorScores]:
        boxes, logits, _ = self._run(x255)
        return [AnchorScores("retinaface", boxes.cpu(), logits, self.score_threshold)]


def load_retinaface(path: str | Path, device="cpu") -> RetinaFace:
    """RetinaFace from facexlib's ``detection_Resnet50_Final.pth`` (``weights_only=True``)."""
    from .loader import read_state_dict
    path = Path(path)
    sd = read_state_dict(path)
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    net = RetinaFaceNet()
    expected = net.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path} is not a RetinaFace ResNet-50 in facexlib's layout ({FILENAME}): "
                         f"{len(missing)} missing key(s) (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    try:
        net.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensor shapes do not fit RetinaFace ResNet-50: {str(e)[:300]}") from e
    return RetinaFace(net).to(device)
