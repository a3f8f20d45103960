"""FaceNet: the CASIA-WebFace graph converter (parity with OpenCV's reading of the graph) and
the converted recognizer on real faces (faces-13id: verification and identification)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_package
from face_fixtures import casia_face_model, casia_safetensors, faces13


def test_casia_conversion_matches_opencv():
    cv2 = require_package("cv2", "opencv-python-headless, requirements-test.txt")
    from diffprivacy.guidance.face.facenet import find_casia_graph
    from diffprivacy.guidance.face.loader import load_recognizer
    rec = load_recognizer("facenet-casia", path=casia_safetensors())
    assert hasattr(cv2.dnn, "readNetFromTensorflow"), (
        f"OpenCV {cv2.__version__} has no TensorFlow importer (5.1 dropped it): requirements-lock.txt pins 5.0")
    net = cv2.dnn.readNetFromTensorflow(str(find_casia_graph()))
    x = np.random.RandomState(0).uniform(-1, 1, (1, 3, 160, 160)).astype(np.float32)
    net.setInput(x)
    ref = net.forward()  # the graph ends with L2 normalisation
    with torch.no_grad():
        ours = torch.nn.functional.normalize(rec.net(torch.from_numpy(x)), dim=1).numpy()
    assert ours.shape == ref.shape == (1, 512)
    assert np.abs(ours - ref).max() < 1e-5


def test_converted_file_has_metadata_and_no_batchnorm_in_convs():
    from safetensors import safe_open
    with safe_open(str(casia_safetensors()), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert "CASIA" in meta["source"] and "folded" in meta["architecture"]
    assert "conv2d_1a.conv.bias" in keys and "conv2d_1a.bn.weight" not in keys
    assert sum(k.endswith(".weight") and "conv" in k for k in keys) == 132


def test_same_model_loaded_twice_is_cached():
    from diffprivacy.guidance.face.loader import load_recognizer
    a = load_recognizer("facenet-casia", path=casia_safetensors())
    b = load_recognizer("facenet-casia", path=casia_safetensors())
    assert a is b


@pytest.fixture(scope="module")
def casia_embeddings():
    images, landmarks, labels = faces13()
    model = casia_face_model()
    with torch.no_grad():
        emb = torch.cat([model.embed(img.permute(2, 0, 1)[None], lm[None]) for img, lm in zip(images, landmarks)])
    return emb, labels, model


def test_casia_verification_on_faces13(casia_embeddings):
    emb, labels, model = casia_embeddings
    assert model.metric == "l2" and model.threshold == pytest.approx(1.1)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-4)
    i, j = torch.triu_indices(len(labels), len(labels), 1)
    d = model.distance(emb[i], emb[j])
    same = labels[i] == labels[j]
    assert d[same].mean() < d[~same].mean() - 0.4
    accuracy = (model.same_identity(emb[i], emb[j]) == same).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_casia_rank1_identification_on_faces13(casia_embeddings):
    emb, labels, model = casia_embeddings
    d = torch.cdist(emb, emb) + torch.eye(len(labels)) * 100  # a photo is not its own match
    rank1 = (labels[d.argmin(dim=1)] == labels).float().mean().item()
    assert rank1 >= 0.95, rank1
