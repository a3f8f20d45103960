"""ArcFace IResNet rebuilt from insightface-style ONNX files: parity with onnxruntime, bad files.

No real insightface pack is available offline, so the test writes a tiny IResNet with the
same structure as insightface's arcface_torch (BN-first residual blocks, PReLU, bn2 -> fc ->
features), exports it with torch.onnx as insightface did, puts it in a fake model pack folder
and loads it through the pack's loader exactly as a real ``w600k_r50.onnx``.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from diffprivacy.guidance.face import iresnet  # noqa: E402


class RefBlock(nn.Module):  # insightface arcface_torch IBasicBlock
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class RefIResNet(nn.Module):
    def __init__(self, widths=(8, 16, 16, 32), layers=(1, 2, 1, 1), emb=24):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU(widths[0])
        blocks, cin = [], widths[0]
        for w, n in zip(widths, layers):
            for i in range(n):
                blocks.append(RefBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * 7 * 7, emb)
        self.features = nn.BatchNorm1d(emb)

    def forward(self, x):
        x = self.layers(self.prelu(self.bn1(self.conv1(x))))
        return self.features(self.fc(self.dropout(self.bn2(x)).flatten(1)))


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # non-trivial BN statistics so folding is really exercised
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.rand(m.num_parameters, generator=g) * 0.5)
    return model.eval()


def export_tiny_iresnet(path, **kw):
    torch.manual_seed(0)
    model = _randomised(RefIResNet(**kw))
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 112, 112), buf, dynamo=False, input_names=["input.1"],
                      dynamic_axes={"input.1": {0: "batch"}})
    path.write_bytes(buf.getvalue())
    return model


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("iresnet") / "w600k_r50.onnx"
    ref = export_tiny_iresnet(path)
    return path, ref


def test_rebuilt_iresnet_matches_onnxruntime(tiny_onnx):
    path, ref = tiny_onnx
    net = iresnet.iresnet_from_onnx(path)
    assert len(net.blocks) == 5 and sum(b.downsample is not None for b in net.blocks) == 4
    rec = iresnet.ArcFaceRecognizer(net)
    crops = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = rec(crops)
        theirs = iresnet.onnx_embed(path, crops)
        ref_out = ref((crops * 255 - 127.5) / 127.5)
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert cos.min() >= 0.9999
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours, ref_out, atol=1e-4, rtol=1e-4)


def test_rebuilt_iresnet_is_differentiable(tiny_onnx):
    rec = iresnet.ArcFaceRecognizer(iresnet.iresnet_from_onnx(tiny_onnx[0]))
    crops = torch.rand(2, 3, 112, 112, requires_grad=True)
    rec(crops).square().sum().backward()
    assert crops.grad is not None and crops.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in rec.parameters())


def test_not_an_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "w600k_r50.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        iresnet.iresnet_from_onnx(bad)


def test_onnx_of_another_network_is_refused(tmp_path):
    path = tmp_path / "other.onnx"
    buf = io.BytesIO()
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 112, 112), buf,
                      dynamo=False)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not an ArcFace IResNet"):
        iresnet.iresnet_from_onnx(path)


def test_wrong_input_size_is_refused(tmp_path):
    path = tmp_path / "big.onnx"
    model = _randomised(RefIResNet())
    model.fc = nn.Linear(32 * 8 * 8, 24)
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(1, 3, 128, 128), buf, dynamo=False)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"input shape .* is not \(N, 3, 112, 112\)"):
        iresnet.iresnet_from_onnx(path)
