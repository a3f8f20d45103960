"""The paper's metrics on real faces (faces-13id, group photos): identification accuracy of the
originals with dlib and FaceNet-CASIA, a copy's PSNR and protection rate, detection counts."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from conftest import shared_path
from face_fixtures import dlib_faces13, dlib_model
from diffprivacy.evaluation.identity import leave_one_out_identification
from diffprivacy.evaluation.images import load_image
from diffprivacy.evaluation.run import Item, evaluate


def test_originals_identified_by_dlib():
    analyses, labels = dlib_faces13()
    assert all(a.detected for a in analyses.values())
    emb = {n: a.embedding for n, a in analyses.items()}
    acc, pairs = leave_one_out_identification(dlib_model(), emb, emb, labels)
    assert pairs == sum(len([m for m in labels if labels[m] == labels[n] and m != n]) for n in labels)
    assert acc >= 0.95


def test_originals_identified_by_facenet_casia():
    from face_fixtures import casia_face_model, faces13
    model = casia_face_model()
    imgs, landmarks, labels = faces13()
    with torch.no_grad():
        emb = {i: model.embed(img.permute(2, 0, 1)[None], lm[None])[0]
               for i, (img, lm) in enumerate(zip(imgs, landmarks))}
    acc, pairs = leave_one_out_identification(model, emb, emb, {i: int(l) for i, l in enumerate(labels)})
    assert pairs > 200 and acc >= 0.95
    # someone else's photos as the "evaluated" set break identification: the protocol can fail
    shuffled = {i: emb[(i + 9) % len(emb)] for i in emb}
    bad, _ = leave_one_out_identification(model, emb, shuffled, {i: int(l) for i, l in enumerate(labels)})
    assert bad < 0.3


def test_copy_scores_infinite_psnr_and_zero_protection():
    analyses, labels = dlib_faces13()
    names = ["img25.jpg", "img12.jpg", "img46.jpg"]  # small photos: quick metrics
    path = lambda n: shared_path("data", "faces-13id", n)  # noqa: E731
    items = [Item(n, partial(load_image, path(n)), partial(load_image, path(n)), None, labels[n]) for n in names]
    rep = evaluate(items, {"dlib": dlib_model()}, lpips="off")
    s = rep["recognizers"]["dlib"]
    assert rep["protected_pixels"]["psnr"] == math.inf and rep["protected_pixels"]["identical"] == 3
    assert s["protection"]["success_rate"] == 0.0 and s["protection"]["success_rate_aligned"] == 0.0
    assert s["utility"]["detection_rate_protected"] == 1.0 and s["utility"]["box_distance"] == 0.0
    for r in rep["per_file"]:
        assert r["models"]["dlib"]["distance"] == pytest.approx(0.0, abs=1e-6)
        # the same face as in the session analysis: detection is deterministic
        assert torch.allclose(rep["_embeddings"]["dlib"]["original"][r["file"]], analyses[r["file"]].embedding)


@pytest.mark.parametrize("photo,faces", [("group-6-faces.jpg", (6, 6)), ("group-8-faces.jpg", (7, 8))])
def test_detection_counts_on_group_photos_with_mtcnn(photo, faces):
    from face_fixtures import casia_face_model
    from diffprivacy.evaluation.analysis import analyse_face
    a = analyse_face(casia_face_model(), load_image(shared_path("data", "photos", photo)), embed=False)
    assert faces[0] <= a.n_faces <= faces[1]
    assert a.embedding is None and len(a.points) == a.n_faces and a.points[0].shape == (5, 2)
