"""The one method contract (methods/contract.py) and the one progress shape (guidance/progress.py): a method gets
the chosen faces as crops, its results are pasted back at the photo's size, a bad photo never stops a batch, and
a method that breaks the contract is an error, not a wrong picture."""
from dataclasses import dataclass

import pytest
import torch

from diffprivacy.guidance.face.base import Face, NoFaceError
from diffprivacy.guidance.progress import Step, report, within
from diffprivacy.methods import contract
from diffprivacy.methods.pipeline import FULL_SIZE, Plan, PipelineOptions, face_crop


class _Faces:
    """A detector returning fixed faces; none on an image whose mean is below 0.1 (a "faceless" photo)."""

    def __init__(self, *boxes):
        self.faces = [Face(torch.tensor(b, dtype=torch.float32), torch.zeros(5, 2), 0.9) for b in boxes]

    def detect(self, image):
        return list(self.faces) if float(image.mean()) > 0.1 else []


@dataclass(frozen=True)
class _Settings:
    value: float = 1.0


def _brighten(calls):
    """A method that sets its crop's face region to ``settings.value`` and records what it got."""
    def run(crops, models, settings, progress=None):
        faces = []
        for n, job in enumerate(crops):
            calls.append(job)
            report(progress, n + 1, len(crops), f"face {n + 1}")
            out = job.image.clone()
            out[0][job.face_mask() > 0] = settings.value
            faces.append(contract.FaceResult(out, {"face": job.crop.face_index}))
        return contract.MethodResult(faces)
    return run


def _batch(n=2, h=120, w=200):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25


def test_each_chosen_face_reaches_the_method_as_its_crop_and_comes_back_pasted_at_the_photos_size():
    calls = []
    method = contract.Method("brighten", _brighten(calls), _Settings)
    images = _batch()
    models = contract.Models(face_model=_Faces((90, 40, 110, 60), (20, 20, 50, 50)))
    delivery = contract.protect(images, method, models, _Settings(1.0), resolution=64, receipt=False)
    assert delivery.images.shape == images.shape
    assert [(j.photo, j.position, j.resolution, j.crop.face_index) for j in calls] == [
        (0, 0, 64, 0), (0, 1, 64, 1), (1, 0, 64, 0), (1, 1, 64, 1)]
    for d in delivery.delivered:
        outside = d.plan.mask() == 0
        assert torch.equal(d.images[0][outside], images[d.index][outside])  # bit-identical outside the masks
        x1, y1, x2, y2 = (int(v) for v in d.plan.crops[0].face_box)
        assert d.images[0, y1 + 2:y2 - 2, x1 + 2:x2 - 2].min() > 0.99     # the method's change is pasted in
    assert len(delivery.crops) == 4 and delivery.crops[0].shape == (1, 64, 64, 3)


def test_a_photo_without_a_face_is_reported_and_the_rest_of_the_batch_is_delivered():
    method = contract.Method("brighten", _brighten([]), _Settings)
    images = _batch(3)
    images[1] = 0.0  # no face found there
    delivery = contract.protect(images, method, contract.Models(face_model=_Faces((90, 40, 110, 60))),
                                _Settings(), resolution=64, receipt=False)
    assert [d.index for d in delivery.delivered] == [0, 2]
    assert [i for i, _ in delivery.failures] == [1]
    assert "image 1: not protected" in delivery.report()
    with pytest.raises(NoFaceError):  # one photo: its own error
        contract.protect(images[1:2], method, contract.Models(face_model=_Faces((90, 40, 110, 60))), _Settings(),
                         resolution=64, receipt=False)
    with pytest.raises(ValueError, match="no image of the batch could be protected"):
        contract.protect(torch.zeros(2, 120, 200, 3), method,
                         contract.Models(face_model=_Faces((90, 40, 110, 60))), _Settings(), resolution=64,
                         receipt=False)


def test_a_method_that_returns_a_result_per_photo_instead_of_per_crop_is_an_error():
    def lazy(crops, models, settings, progress=None):
        return contract.MethodResult([contract.FaceResult(crops[0].image)])
    method = contract.Method("lazy", lazy, _Settings)
    with pytest.raises(RuntimeError, match="1 result"):
        contract.protect(_batch(1), method, contract.Models(face_model=_Faces((90, 40, 110, 60), (20, 20, 50, 50))),
                         _Settings(), resolution=64, receipt=False)


def test_another_methods_settings_are_refused_before_any_work():
    calls = []
    method = contract.Method("brighten", _brighten(calls), _Settings)
    with pytest.raises(TypeError, match="_Settings"):
        contract.protect(_batch(1), method, contract.Models(face_model=_Faces((90, 40, 110, 60))), object(),
                         resolution=64, receipt=False)
    assert calls == []


def test_a_one_face_method_takes_the_largest_face_unless_told_and_refuses_two_chosen_faces():
    calls = []
    method = contract.Method("one face", _brighten(calls), _Settings, max_faces=1)
    models = contract.Models(face_model=_Faces((20, 20, 50, 50), (90, 40, 110, 60)))
    contract.protect(_batch(1), method, models, _Settings(), resolution=64, receipt=False)
    assert [j.crop.face_index for j in calls] == [0]
    with pytest.raises(ValueError, match="1 face\\(s\\) at a time and 2 are chosen"):
        contract.protect(_batch(1), method, models, _Settings(), PipelineOptions(faces="all"), resolution=64,
                         receipt=False)


def test_per_crop_inputs_are_handed_out_by_photo_and_crop_position():
    method = contract.Method("brighten", _brighten([]), _Settings)
    images = _batch(3)
    images[1] = 0.0
    planned = contract.plan_batch(images, method, _Faces((90, 40, 110, 60), (20, 20, 50, 50)), None, 64)
    assert planned.positions() == [(0, 0), (0, 1), (2, 0), (2, 1)] and planned.crop_count == 4
    assert [i for i, *_ in planned.failures] == [1]


def test_a_full_size_method_gets_the_whole_photo_and_its_receipt_plan_is_the_faces_it_protected():
    seen = []

    def full(crops, models, settings, progress=None):
        seen.append(crops[0].image.shape)
        photo = crops[0].image[0]
        faces = models.face_model.detect(photo)
        plan = Plan(photo.shape[0], photo.shape[1], 0, FULL_SIZE,
                    (face_crop(faces[0], 0, photo.shape[0], photo.shape[1], PipelineOptions()),))
        return contract.MethodResult([contract.FaceResult(crops[0].image * 0.5)], plan=plan)
    method = contract.Method("full", full, _Settings, full_size=True)
    images = _batch(1)
    delivery = contract.protect(images, method, contract.Models(face_model=_Faces((90, 40, 110, 60))), _Settings(),
                                receipt=False)
    assert seen == [(1, 120, 200, 3)]
    assert torch.equal(delivery.images, images * 0.5)
    assert delivery.delivered[0].plan.mode == FULL_SIZE and len(delivery.delivered[0].plan.crops) == 1


def test_progress_of_each_photo_arrives_as_its_share_of_the_batch():
    steps = []
    method = contract.Method("brighten", _brighten([]), _Settings)
    contract.protect(_batch(2), method, contract.Models(face_model=_Faces((90, 40, 110, 60), (20, 20, 50, 50))),
                     _Settings(), resolution=64, progress=steps.append, receipt=False)
    assert [(s.done, s.total) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert steps[0].text == "image 1/2: face 1" and steps[-1].text == "image 2/2: face 2"


def test_within_keeps_a_parts_detail_and_refuses_a_part_outside_the_whole():
    got = []
    inner = within(got.append, 1, 3, "face 2/3")
    inner(Step(5, 10, "iteration 5", {"history": [1.0]}))
    assert got == [Step(15, 30, "face 2/3: iteration 5", {"history": [1.0]})]
    assert within(None, 0, 1) is None
    with pytest.raises(ValueError):
        within(got.append, 3, 3)


def test_diff_privacy_settings_are_checked_once_when_built():
    from diffprivacy.methods.diff_privacy import ANONYMIZE, HIDE, ProtectionSettings
    with pytest.raises(ValueError, match="strength"):
        ProtectionSettings("anonymize", 0, 50, 0.0, 0.4)
    with pytest.raises(ValueError, match="NaN"):
        ProtectionSettings("hide", 0, 50, 0.6, float("nan"))
    with pytest.raises(ValueError, match="task"):
        ProtectionSettings("blur", 0, 50, 0.6, 0.4)
    for bad in (float("nan"), float("inf"), 2.5, 0):
        with pytest.raises(ValueError, match="steps must be a whole number"):
            ProtectionSettings("hide", 0, bad, 0.6, 0.4)
    with pytest.raises(ValueError, match="given settings for anonymize"):
        HIDE.run([], contract.Models(), ProtectionSettings("anonymize", 0, 50, 0.6, 0.4))
    assert ANONYMIZE.settings_type is ProtectionSettings


def test_the_nodes_progress_bar_takes_steps_only_and_follows_their_total(monkeypatch):
    from diffprivacy.nodes import common
    lines = []
    monkeypatch.setattr(common, "send_progress_text", lambda text, node_id: lines.append(text))
    bar = common.StepProgress(3, node_id="7", text_every_s=0.0)
    bar(Step(2, 8, "iteration 2/8"))
    assert bar.total == 8 and lines == ["iteration 2/8"]
    with pytest.raises(TypeError, match="Step"):
        bar(2)  # an old-shape call is an error, not a silently wrong bar
