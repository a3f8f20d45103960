"""SCRFD's ONNX graph run by the pack's torch interpreter, checked against onnxruntime.

The graph is a small network of SCRFD's layout built here (no weights are downloaded): a conv-BN-ReLU stem,
strided stages, a top-down FPN with nearest upsampling, and per stride (8, 16, 32) a sigmoid score head, a box
head multiplied by a learnt scale, and a keypoint head, each flattened to (N, C) with 2 anchors per cell as
insightface exports them. It is exported with dynamic height and width, so the graph also carries the
Shape/Gather/Concat plumbing real exports have. onnxruntime is a test-only dependency.
"""
from __future__ import annotations

import io

import pytest
import torch
from conftest import require_package
import torch.nn.functional as F
from torch import nn

ort = require_package("onnxruntime", "onnxruntime from requirements-test.txt")

from diffprivacy.guidance.face.onnx_torch import load_onnx_module  # noqa: E402
from diffprivacy.guidance.face.scrfd import SCRFD  # noqa: E402


def _cbr(i, o, s=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class SCRFDLayout(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(_cbr(3, 8, 2), nn.MaxPool2d(2, 2), _cbr(8, 8))          # stride 4
        self.s8, self.s16, self.s32 = _cbr(8, 16, 2), _cbr(16, 16, 2), _cbr(16, 16, 2)
        self.lat = nn.ModuleList(nn.Conv2d(16, 8, 1) for _ in range(3))
        self.cls = nn.ModuleList(nn.Conv2d(8, 2, 3, 1, 1) for _ in range(3))
        self.reg = nn.ModuleList(nn.Conv2d(8, 8, 3, 1, 1) for _ in range(3))
        self.kps = nn.ModuleList(nn.Conv2d(8, 20, 3, 1, 1) for _ in range(3))
        self.scale = nn.Parameter(torch.tensor([1.0, 0.8, 1.2]))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        c8 = self.s8(self.stem(x))
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p32 = self.lat[2](c32)
        p16 = self.lat[1](c16) + F.interpolate(p32, scale_factor=2.0, mode="nearest")
        p8 = self.lat[0](c8) + F.interpolate(p16, scale_factor=2.0, mode="nearest")
        scores, boxes, kps = [], [], []
        for i, p in enumerate((p8, p16, p32)):
            scores.append(torch.sigmoid(self.cls[i](p)).permute(0, 2, 3, 1).reshape(-1, 1))
            boxes.append((self.reg[i](p) * self.scale[i]).permute(0, 2, 3, 1).reshape(-1, 4))
            kps.append(self.kps[i](p).permute(0, 2, 3, 1).reshape(-1, 10))
        return (*scores, *boxes, *kps)


@pytest.fixture(scope="module")
def scrfd_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("scrfd-layout") / "det_10g.onnx"
    buf = io.BytesIO()
    torch.onnx.export(SCRFDLayout().eval(), torch.zeros(1, 3, 96, 96), buf, dynamo=False, input_names=["input.1"],
                      dynamic_axes={"input.1": {2: "h", 3: "w"}})
    path.write_bytes(buf.getvalue())
    return path


def test_torch_graph_matches_onnxruntime_on_every_output(scrfd_onnx):
    mod = load_onnx_module(scrfd_onnx)
    sess = ort.InferenceSession(str(scrfd_onnx), providers=["CPUExecutionProvider"])
    for h, w in ((96, 96), (64, 128)):                       # dynamic input size
        x = torch.randn(1, 3, h, w)
        ours = mod(x)
        ref = sess.run(None, {"input.1": x.numpy()})
        assert len(ours) == len(ref) == 9
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            assert (a - torch.from_numpy(b)).abs().max() < 1e-4


def test_scrfd_detects_what_onnxruntime_detects_and_has_gradients(scrfd_onnx):
    from diffprivacy.evaluation.detection import scrfd_onnxruntime_detector
    det = SCRFD(scrfd_onnx, input_size=96)
    img = torch.rand(80, 120, 3)
    # random weights: take the threshold that lets the top 5 % of anchors through
    probs = torch.sigmoid(det.anchor_scores(img.permute(2, 0, 1)[None] * 255)[0].logits.detach())
    det.score_threshold = float(probs.quantile(0.95))
    ours = det.detect(img)
    ref = scrfd_onnxruntime_detector(scrfd_onnx, score_threshold=det.score_threshold, input_size=96)(img)
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        assert torch.allclose(a.box, b.box, atol=1e-2) and abs(a.score - b.score) < 1e-4
    # the attack reads logits (no sigmoid saturation) that carry gradients to the pixels
    x = (img.permute(2, 0, 1)[None] * 255).requires_grad_(True)
    (a,) = det.anchor_scores(x)
    assert torch.allclose(torch.sigmoid(a.logits.detach()).max(), torch.tensor(max(f.score for f in ours)), atol=1e-5)
    (g,) = torch.autograd.grad(a.logits.sum(), x)
    assert g.abs().sum() > 0


def test_an_unsupported_op_is_named_when_the_graph_loads(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)
    buf = io.BytesIO()
    torch.onnx.export(Odd().eval(), torch.zeros(1, 3, 8, 8), buf, dynamo=False)
    p = tmp_path / "odd.onnx"
    p.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"ONNX op\(s\) \['CumSum'\] are not supported"):
        load_onnx_module(p)
