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

from conftest import require_package

onnx = require_package("onnx", "requirements.txt")
ort = require_package("onnxruntime", "requirements.txt")

from diffprivacy.guidance.face import iresnet  # noqa: E402
from face_fixtures import RefIResNet, export_tiny_iresnet, randomised  # noqa: E402


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
    model = randomised(RefIResNet())
    model.fc = nn.Linear(32 * 8 * 8, 24)
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(1, 3, 128, 128), buf, dynamo=False)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"input shape .* is not \(N, 3, 112, 112\)"):
        iresnet.iresnet_from_onnx(path)
