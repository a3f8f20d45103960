"""Differentiable alignment: exact similarity estimation, crops matching the reference aligned
photo, and gradients of a real recognizer's loss reaching the input image (finite differences)."""
from __future__ import annotations

import math

import torch

from conftest import shared_path
from face_fixtures import casia_safetensors, load_photo, mtcnn
from diffprivacy.guidance.face.align import (ARCFACE_TEMPLATE_112, align_faces, estimate_similarity,
                                             invert_affine, warp_affine)


def test_similarity_is_recovered_exactly():
    a, s, t = 0.3, 1.7, torch.tensor([12.0, -5.0])
    rot = s * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    src = torch.rand(2, 5, 2) * 100
    dst = src @ rot.T + t
    m = estimate_similarity(src, dst)
    assert torch.allclose(m[:, :, :2], rot.expand(2, 2, 2), atol=1e-4)
    assert torch.allclose(m[:, :, 2], t.expand(2, 2), atol=1e-3)
    assert torch.allclose(invert_affine(invert_affine(m)), m, atol=1e-4)


def test_identity_warp_reproduces_the_image():
    img = torch.rand(1, 3, 20, 20)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    assert torch.allclose(warp_affine(img, eye, 20), img, atol=1e-5)


def test_aligning_the_reference_crop_by_its_landmarks_is_nearly_identity():
    img = load_photo(shared_path("data", "photos", "aligned-112.png"))
    face = mtcnn().detect(img)[0]
    # an ArcFace-aligned crop has its landmarks near the template already
    assert (face.landmarks - ARCFACE_TEMPLATE_112).abs().max() < 10.0  # MTCNN is a few px off
    x = img.permute(2, 0, 1)[None]
    exact = align_faces(x, ARCFACE_TEMPLATE_112[None], ARCFACE_TEMPLATE_112, 112)
    assert torch.allclose(exact, x, atol=1e-4)
    crop = align_faces(x, face.landmarks[None], ARCFACE_TEMPLATE_112, 112)
    inner = (slice(None), slice(None), slice(20, 92), slice(20, 92))
    err = (crop - x)[inner].abs().mean()
    assert err < 0.1
    assert err < 0.5 * (crop - x.flip(-2))[inner].abs().mean()  # far closer than a mismatched image


def test_recognizer_loss_gradient_reaches_the_image_through_alignment():
    from diffprivacy.guidance.face.base import FaceModel
    from diffprivacy.guidance.face.loader import load_recognizer
    rec = load_recognizer("facenet-casia", path=casia_safetensors(), dtype=torch.float64)
    model = FaceModel(None, rec)
    photo = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))
    lm = mtcnn().detect(photo)[0].landmarks[None].double() + 64
    # reflect-padded so the crop never reads the zero border: equal zeros tie in max-pools, whose
    # derivative then jumps under any perturbation and finite differences mean nothing
    img = torch.nn.functional.pad(photo.permute(2, 0, 1)[None].double(), (64, 64, 64, 64), mode="reflect")
    target = model.embed(img, lm).detach()
    g = torch.Generator().manual_seed(0)
    x0 = 0.05 + 0.9 * img + 0.02 * torch.randn(img.shape, generator=g, dtype=torch.float64)

    def loss(x):
        return model.distance(model.embed(x, lm), target).sum()

    x = x0.clone().requires_grad_(True)
    loss(x).backward()
    grad = x.grad
    assert grad.abs().sum() > 0
    # nothing outside the face region gets gradient: the crop only reads near the landmarks
    assert grad[..., :40, :].abs().max() == 0
    for seed in (1, 2):
        v = torch.randn(img.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        eps = 1e-7  # ReLU/max-pool kinks: the network is smooth only very locally (float64 allows it)
        with torch.no_grad():
            fd = (loss(x0 + eps * v) - loss(x0 - eps * v)) / (2 * eps)
        assert torch.isclose(fd, (grad * v).sum(), rtol=2e-3, atol=1e-9), (fd, (grad * v).sum())
