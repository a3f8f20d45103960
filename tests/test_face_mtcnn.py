"""MTCNN in plain torch on real photos, face choice, NMS."""
from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from face_fixtures import load_photo, mtcnn
from diffprivacy.guidance.face.base import Face, NoFaceError, choose_faces
from diffprivacy.guidance.face.mtcnn import nms


@pytest.mark.parametrize("name, low, high", [("group-6-faces.jpg", 6, 6), ("group-8-faces.jpg", 7, 8),
                                             ("one-face-astronaut.png", 1, 1)])
def test_mtcnn_finds_the_faces_of_real_photos(name, low, high):
    img = load_photo(shared_path("data", "photos", name))
    faces = mtcnn().detect(img)
    assert low <= len(faces) <= high, [f.score for f in faces]
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    for f in faces:
        x1, y1, x2, y2 = f.box.tolist()
        lm = f.landmarks
        assert f.score >= 0.9
        # landmarks inside (a slightly grown) box, in insightface order: eyes above mouth, left eye left
        assert (lm[:, 0] > x1 - 0.1 * (x2 - x1)).all() and (lm[:, 0] < x2 + 0.1 * (x2 - x1)).all()
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
        assert lm[:2, 1].max() < lm[3:, 1].min()


def test_mtcnn_on_a_downscaled_copy_gives_the_same_landmarks():
    img = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))
    full = mtcnn().detect(img)[0]
    from diffprivacy.guidance.face.mtcnn import MTCNN
    m = mtcnn()
    small = MTCNN(m.pnet, m.rnet, m.onet, max_side=256).detect(img)[0]  # analysed at half size, mapped back
    assert (small.landmarks - full.landmarks).abs().max() < 4.0


def test_mtcnn_finds_nothing_in_a_blank_image():
    assert mtcnn().detect(torch.full((200, 300, 3), 0.5)) == []
    with pytest.raises(NoFaceError, match="image 3 of the batch"):
        choose_faces([], "largest", batch_index=3)


def test_mtcnn_rejects_a_wrong_layout():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        mtcnn().detect(torch.rand(3, 64, 64))


def _face(x, size, score=0.99):
    return Face(torch.tensor([x, 0.0, x + size, size]), torch.zeros(5, 2), score)


def test_choose_faces_modes():
    faces = [_face(0, 50), _face(100, 80), _face(200, 20)]
    assert choose_faces(faces, "largest")[0] is faces[1]
    assert choose_faces(faces, "index", 2)[0] is faces[2]
    assert choose_faces(faces, "all") == faces
    with pytest.raises(ValueError, match="face index 5 is out of range: 3 face"):
        choose_faces(faces, "index", 5)
    with pytest.raises(ValueError, match="face choice must be one of"):
        choose_faces(faces, "biggest")


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 4, 4]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 1, 2]
    keep_min = nms(boxes, scores, 0.5, method="min").tolist()
    assert 3 in keep_min and 0 not in keep_min and 2 in keep_min
