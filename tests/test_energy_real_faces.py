"""Identity energy guidance through REAL networks, judged by a recognizer the guidance never saw.

The guidance path of Diff-Privacy is latent -> decoder -> alignment at fixed landmarks ->
recognizer -> energy -> gradient -> latent update. Here every part is real and trained: the
latent is a real photo's latent in the tiny FLUX.2 autoencoder (taef2, ../shared/weights), the
recognizer is FaceNet-CASIA with MTCNN landmarks, and the energies are the pack's. No UNet: a few
steps of x <- x - lr * dE/dx (gradient normalised per sample, so every run moves the latent
equally far). dlib's ResNet (L2, same person iff distance < 0.6), never used by the guidance,
judges the identity of the decoded results, at dlib's own face box on the original.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_path
from face_fixtures import small_face_image

SIZE = 192    # pixels; the latent is 32 x 24 x 24
STEPS = 8
STEP_RMS = 0.01  # latent change per element per step (taef2 latents have std ~0.9)


@pytest.fixture(scope="module")
def setup():
    from diffprivacy.guidance.face.dlib_face import load_dlib_face_model
    from taef2 import load
    from face_fixtures import casia_face_model

    photo = shared_path("data", "photos", "obama.jpg")
    encoder, decoder = load(shared_path("weights"))
    image = torch.from_numpy(np.array(small_face_image(photo, SIZE))).float() / 255.0  # (H, W, 3)
    with torch.no_grad():
        z0 = encoder(image.permute(2, 0, 1)[None])
    judge = load_dlib_face_model(work_size=512)
    (face,) = judge.detect(image)[:1]
    reference = judge.embed(image.permute(2, 0, 1)[None], face.landmarks[None])

    def dlib_distance(z):
        with torch.no_grad():
            images = decode(z)
        emb = judge.embed(images, face.landmarks.expand(len(images), 5, 2))
        return (emb - reference).norm(dim=1)

    def decode(z):
        return decoder(z).clamp(0, 1)

    return image, z0, decode, casia_face_model(), dlib_distance, judge.threshold


def guide(face_model, decode, image, energy, z, steps=STEPS):
    """Normalised gradient descent of ``energy`` on latents ``z``; returns (z, FaceNet distance to the original)."""
    from diffprivacy.guidance.guided_ddim import IdentityGuidance
    guidance = IdentityGuidance.from_image(face_model, decode, image, energy)
    energies = []
    for _ in range(steps):
        value, grad = guidance.energy_and_grad(z)
        energies.append(value)
        unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        z = z - STEP_RMS * z[0].numel() ** 0.5 * unit
    with torch.no_grad():
        emb = guidance.embed(z)
    return z, face_model.distance(emb, guidance.reference.expand_as(emb)), energies


def test_real_latent_round_trip_keeps_the_identity(setup):
    image, z0, decode, face_model, dlib_distance, threshold = setup
    assert threshold == pytest.approx(0.6)
    assert float(dlib_distance(z0)) < 0.4  # taef2 reconstructs a face dlib still recognises


def test_anonymize_guidance_moves_dlib_identity_away(setup):
    from diffprivacy.guidance.energy import anonymize_energy
    image, z0, decode, face_model, dlib_distance, threshold = setup
    torch.manual_seed(0)
    start = z0 + 0.3 * torch.randn(2, *z0.shape[1:])  # two noisings, as the task's outputs
    unguided = dlib_distance(start)
    z, facenet, energies = guide(face_model, decode, image, anonymize_energy(), start)
    guided = dlib_distance(z)
    assert energies[-1] < energies[0]
    assert (facenet > face_model.threshold).all(), facenet  # the guiding recognizer: another person
    assert (guided > unguided + 0.15).all(), (guided, unguided)  # the unseen judge agrees
    assert guided.mean() > threshold, guided


def test_hide_guidance_keeps_dlib_identity(setup):
    from diffprivacy.guidance.energy import hide_energy
    image, z0, decode, face_model, dlib_distance, threshold = setup
    torch.manual_seed(1)
    start = z0 + 1.0 * torch.randn(2, *z0.shape[1:])  # strong noise: dlib barely (or no longer) matches
    unguided = dlib_distance(start)
    z, facenet, energies = guide(face_model, decode, image, hide_energy(), start)
    guided = dlib_distance(z)
    assert energies[-1] < energies[0]
    assert (facenet < face_model.threshold).all(), facenet  # the guiding recognizer: the same person
    assert guided.mean() < threshold, (guided, unguided)  # the unseen judge: still the same person ...
    assert (guided < unguided).all() and (unguided - guided).mean() > 0.05, (guided, unguided)  # ... thanks to L_is
