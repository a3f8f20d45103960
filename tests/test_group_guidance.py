"""Every chosen face of a group photo is steered at once, each against its own original; faces not chosen are
left exactly as unguided sampling leaves them. Real MTCNN + FaceNet-CASIA on the shared group photo; the
"latent" is the photo itself (identity decoder), so where the gradient lands is exact."""
from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from face_fixtures import casia_face_model, load_photo

from diffprivacy.guidance.energy import anonymize_energy
from diffprivacy.guidance.guided_ddim import IdentityGuidance


def _boxes_overlap(a, b, grow: float = 1.0) -> bool:
    """Whether box b meets box a grown by ``grow`` times its size on every side (the aligned crop's reach)."""
    w, h = float(a[2] - a[0]), float(a[3] - a[1])
    ax1, ay1, ax2, ay2 = float(a[0]) - grow * w, float(a[1]) - grow * h, float(a[2]) + grow * w, float(a[3]) + grow * h
    return not (float(b[2]) < ax1 or float(b[0]) > ax2 or float(b[3]) < ay1 or float(b[1]) > ay2)


@pytest.fixture(scope="module")
def group():
    image = load_photo(shared_path("data", "photos", "group-6-faces.jpg"), max_side=640)
    model = casia_face_model()
    faces = model.detect(image)
    assert len(faces) >= 5, "MTCNN finds the faces of the group photo"
    return image, model, faces


def _region_norm(grad, box):
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return float(grad[0, :, max(y1, 0):y2, max(x1, 0):x2].norm())


def test_every_face_of_a_group_photo_receives_gradient_inside_its_box(group):
    image, model, faces = group
    guidance = IdentityGuidance.from_image(model, lambda z: z, image, anonymize_energy(), choice="all")
    assert guidance.num_faces == len(faces)
    latent = image.permute(2, 0, 1)[None].repeat(2, 1, 1, 1) + 0.01 * torch.randn(2, 3, *image.shape[:2])
    _, grad = guidance.energy_and_grad(latent)
    assert all(_region_norm(grad, f.box) > 0 for f in faces), [_region_norm(grad, f.box) for f in faces]


def test_faces_outside_the_chosen_set_match_unguided_sampling(group):
    image, model, faces = group
    guidance = IdentityGuidance.from_image(model, lambda z: z, image, anonymize_energy(), choice="indices",
                                           indices="0, 1")
    assert guidance.num_faces == 2
    latent = image.permute(2, 0, 1)[None].repeat(2, 1, 1, 1) + 0.01 * torch.randn(2, 3, *image.shape[:2])
    _, grad = guidance.energy_and_grad(latent)
    unguided = latent.clone()          # a pixel-local denoising step leaves every pixel where it was...
    guided = latent - 1.0 * grad       # ...and guidance moves only what the chosen faces' crops reach
    chosen, others = faces[:2], faces[2:]
    assert all(_region_norm(grad, f.box) > 0 for f in chosen)
    far = [f for f in others if not any(_boxes_overlap(c.box, f.box) for c in chosen)]
    assert far, "the photo has faces away from the two largest"
    for f in far:
        x1, y1, x2, y2 = (int(round(float(v))) for v in f.box)
        assert torch.allclose(guided[..., y1:y2, x1:x2], unguided[..., y1:y2, x1:x2], atol=1e-6)
