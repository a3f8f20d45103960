"""SCRFD decoding through onnxruntime, with a tiny SCRFD-layout graph written by the test.

The graph has SCRFD's interface (one NCHW input; per stride 8/16/32: scores (N, 1), box
distances (N, 4), keypoint offsets (N, 10), 2 anchors per cell) and fires on bright 8x8
cells at stride 8 with fixed distances, so the expected boxes and landmarks are known in
closed form. It checks the letterbox scaling, anchor centres, distance/offset decoding,
NMS over duplicate anchors and the loader's pack lookup.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import require_package

require_package("onnxruntime", "requirements.txt")

from diffprivacy.guidance.face import loader  # noqa: E402

KPS = torch.tensor([-1.0, -1.0, 1.0, -1.0, 0.0, 0.0, -1.0, 1.0, 1.0, 1.0])


class TinySCRFD(nn.Module):
    def forward(self, x):
        scores, boxes, kps = [], [], []
        for s in (8, 16, 32):
            p = F.avg_pool2d(x[:, :1], s)                          # ~ +1 on bright cells, -1 on dark
            gate = 1.0 if s == 8 else 0.0
            sc = torch.sigmoid(20 * (p - 0.5)) * gate
            n = p.shape[2] * p.shape[3] * 2
            scores.append(sc.repeat(1, 2, 1, 1).permute(0, 2, 3, 1).reshape(n, 1))
            boxes.append((p * 0 + 1).repeat(1, 8, 1, 1).permute(0, 2, 3, 1).reshape(n, 4))
            kps.append((p * 0 + KPS.view(1, 10, 1, 1)).repeat(1, 2, 1, 1).reshape(1, 2, 10, -1)
                       .permute(0, 3, 1, 2).reshape(n, 10))
        return (*scores, *boxes, *kps)


@pytest.fixture(scope="module")
def det_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("scrfd") / "det_10g.onnx"
    buf = io.BytesIO()
    torch.onnx.export(TinySCRFD().eval(), torch.zeros(1, 3, 64, 64), buf, dynamo=False, input_names=["input.1"])
    path.write_bytes(buf.getvalue())
    return path


def test_scrfd_decodes_boxes_and_landmarks(det_onnx):
    det = loader.load_detector("scrfd", path=det_onnx)
    assert det.input_hw == (64, 64) and det.has_kps
    img = torch.zeros(128, 128, 3)            # letterboxed at scale 0.5
    img[32:48, 48:64] = 1.0                   # -> the 8x8 input cell (x=3, y=2) at stride 8
    faces = det.detect(img)
    assert len(faces) == 1                     # the cell's two anchors merged by NMS
    f = faces[0]
    centre = torch.tensor([3 * 8.0, 2 * 8.0]) / 0.5
    assert torch.allclose(f.box, torch.cat([centre - 16, centre + 16]), atol=1e-3)
    assert torch.allclose(f.landmarks, centre + KPS.view(5, 2) * 16, atol=1e-3)
    assert f.score > 0.99
    assert det.detect(torch.zeros(100, 80, 3)) == []


def test_scrfd_found_in_an_insightface_pack(det_onnx, tmp_path, monkeypatch):
    import folder_paths
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(det_onnx.read_bytes())
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(tmp_path / "insightface")], set()))
    det = loader.load_detector("scrfd", pack="buffalo_l")
    assert det.path == pack / "det_10g.onnx"
    assert loader.load_detector("scrfd", pack="auto") is det   # cached


def test_scrfd_refuses_wrong_files(tmp_path):
    bad = tmp_path / "det_10g.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="could not be opened as an ONNX model"):
        loader.load_detector("scrfd", path=bad)
    other = tmp_path / "other.onnx"
    buf = io.BytesIO()
    torch.onnx.export(nn.Conv2d(3, 2, 1).eval(), torch.zeros(1, 3, 32, 32), buf, dynamo=False)
    other.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not an SCRFD detector"):
        loader.load_detector("scrfd", path=other)
