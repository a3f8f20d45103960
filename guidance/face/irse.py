"""ArcFace IR-SE50 (TreB1eN's InsightFace_Pytorch ``Backbone(50, 'ir_se')``), the identity network
the pSp/e4e family and the Diff-Privacy authors use (``model_ir_se50.pth``).

The file is a pickled state dict; it is read with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers only, never code. Parameter names are the original's
(``input_layer.*``, ``body.N.shortcut_layer.*``, ``body.N.res_layer.*``, ``output_layer.*``),
and the depth and widths are read from the keys, so IR-SE 50/100/152 all load.
Input: 112x112 RGB aligned to the ArcFace template, normalised to [-1, 1].
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..weights import read_tensor_file
from .iresnet import ArcFaceRecognizer


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int, reduction: int = 16):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth, reduction))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSEBackbone(nn.Module):
    def __init__(self, units: list[tuple[int, int, int]], emb: int = 512, reduction: int = 16):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.body = nn.Sequential(*[BottleneckIRSE(c, d, s, reduction) for c, d, s in units])
        last = units[-1][1]
        self.output_layer = nn.Sequential(nn.BatchNorm2d(last), nn.Dropout(0.0), nn.Flatten(),
                                          nn.Linear(last * 7 * 7, emb), nn.BatchNorm1d(emb))

    def forward(self, x):
        return self.output_layer(self.body(self.input_layer(x)))


def _units_from_state_dict(sd: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """(in, out, stride) per unit: a unit's width from its res_layer conv; stride 2 where width changes.

    TreB1eN's blocks open every stage with a stride-2 unit, including the first stage (64 -> 64,
    whose shortcut is then a stride-2 MaxPool): a stage starts wherever the width changes or at unit 0.
    """
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"body\.(\d+)\.", k)] if m})
    units, prev = [], 64
    for i in idx:
        w = sd[f"body.{i}.res_layer.1.weight"]
        cin, depth = w.shape[1], w.shape[0]
        units.append((cin, depth, 2 if (i == 0 or depth != prev) else 1))
        prev = depth
    return units


def load_irse(path: str | Path) -> IRSEBackbone:
    path = Path(path)
    sd = read_tensor_file(path, "Expected TreB1eN's model_ir_se50.pth.")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or "input_layer.0.weight" not in sd or not any(k.startswith("body.") for k in sd):
        raise ValueError(f"{path} is not an IR-SE backbone state dict (no input_layer.*/body.* keys); "
                         f"expected TreB1eN's model_ir_se50.pth")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    try:
        units = _units_from_state_dict(sd)
        emb = sd["output_layer.3.weight"].shape[0]
        reduction = units[0][1] // sd["body.0.res_layer.5.fc1.weight"].shape[0]
        net = IRSEBackbone(units, emb, reduction)
        net.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{path} does not fit the IR-SE architecture: {str(e)[:300]}") from e
    return net.eval().requires_grad_(False)


class IRSERecognizer(ArcFaceRecognizer):
    """Same template, metric and threshold as the other ArcFace-family recognizers; the pSp/TreB1eN
    IR-SE50 takes [-1, 1] input instead of insightface's [0, 255] graphs."""

    def __init__(self, net: IRSEBackbone, name: str = "arcface-ir-se50"):
        super().__init__(net, name)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net((crops - 0.5) / 0.5)
