"""Receipts (methods/receipt.py) on real photos with dlib's real recognizer: they can fail both ways."""
import json

import pytest
import torch

from diffprivacy.methods.pipeline import PipelineOptions, plan_photo
from diffprivacy.methods.receipt import (NOT, STILL, manifest_fields, measure_receipt, receipt_for,
                                         receipt_recognizer, receipt_text)


@pytest.fixture(scope="module")
def dlib():
    from face_fixtures import dlib_model
    return dlib_model()


def _photo(shared, name, max_side=4000):
    from face_fixtures import load_photo
    return load_photo(shared("data", "photos", name), max_side=max_side)


def test_an_output_that_is_nearly_the_input_is_still_recognised_on_every_face(shared, dlib):
    photo = _photo(shared, "group-6-faces.jpg")
    plan = plan_photo(photo, dlib, PipelineOptions(), 256)
    nearly = plan.paste(photo, plan.cut(photo))       # what a method at strength ~0 delivers: the crop round trip
    receipt = measure_receipt(photo, nearly, plan, dlib, method="identity")
    faces = receipt["outputs"][0]["faces"]
    assert len(faces) == 6
    assert all(f["found"] and f["verdict"] == STILL and f["distance"] < 0.4 for f in faces), faces
    assert sorted(f["crop_size"] for f in faces) == sorted(c.side for c in plan.crops)
    assert receipt["threshold"] == 0.6 and receipt["recognizer"] == "dlib-resnet128"
    json.dumps(receipt)                                # JSON-ready as it is
    row = manifest_fields(receipt)
    assert row["receipt_faces"] == 6 and row["receipt_still_recognised"] == 6 and row["receipt_found"] == 6


def test_a_receipt_against_another_persons_photo_says_not_recognised(shared, dlib):
    import torch.nn.functional as F
    obama = _photo(shared, "obama.jpg", 800)
    biden = _photo(shared, "biden.jpg", 800)
    biden = F.interpolate(biden.permute(2, 0, 1)[None], size=obama.shape[:2], mode="bilinear",
                          align_corners=False)[0].permute(1, 2, 0)
    plan = plan_photo(obama, dlib, PipelineOptions(faces="largest"), 256)
    receipt = measure_receipt(obama, biden, plan, dlib)
    (face,) = receipt["outputs"][0]["faces"]
    assert face["verdict"] == NOT and face["distance"] > 0.6 and face["recognised"] is False, face
    assert "not recognised" in receipt_text(receipt)
    same = measure_receipt(obama, obama, plan, dlib)["outputs"][0]["faces"][0]
    assert same["verdict"] == STILL and same["distance"] < 1e-6


def test_the_receipt_refuses_the_recognizer_the_method_was_guided_by(dlib):
    with pytest.raises(ValueError, match="fools its own recognizer"):
        receipt_recognizer(guided_by=dlib, override=dlib)
    assert receipt_recognizer(guided_by=None) is dlib  # dlib by default


def test_without_a_recognizer_the_receipt_says_why_and_gives_no_verdict(monkeypatch):
    import diffprivacy.methods.receipt as receipt

    def missing(*_, **__):
        raise ImportError("dlib is not installed")
    monkeypatch.setattr(receipt, "receipt_recognizer", missing)
    photo = torch.rand(64, 64, 3)
    plan = plan_photo(photo, None, PipelineOptions(mode="whole frame"), 64)
    r = receipt_for(photo, photo[None], plan)
    assert r["error"] == "dlib is not installed" and r["outputs"] == []
    assert "not measured" in receipt_text(r) and manifest_fields(r)["receipt_error"]


def test_hiding_from_detectors_at_the_smallest_range_is_still_found_and_recognised_on_its_receipt(shared):
    from diffprivacy.nodes.detector_nodes import DiffPrivacyHideFromDetectors
    photo = _photo(shared, "obama.jpg", 400)[None]
    with torch.inference_mode():
        out = DiffPrivacyHideFromDetectors().hide(photo, detectors="mtcnn", private_faces="largest", face_indices="0",
                                                  range_rp=0.5, epsilon=0.5, iterations=1, robust=False,
                                                  max_megapixels=12.0)
    receipt = json.loads(out["result"][3])
    (face,) = receipt["outputs"][0]["faces"]
    assert face["found"] and face["verdict"] == STILL and face["working_resolution"] == "full size", face
    assert any("still recognised" in line for line in out["ui"]["text"])
