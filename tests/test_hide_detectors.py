"""Hiding faces from detectors (thesis ch. 3): the attack loop on a toy detector whose verdict is known in
closed form, the face choice, the as-saved rules, the node's bad-input handling, and MTCNN with its real
weights on real faces.

The toy detector: anchors on a 16-px grid of 16x16 windows; an anchor's face logit is
``(mean brightness in its window - 200) / 2`` (0-255 scale), a face is any anchor above p = 0.5 (after NMS).
A bright square of value 201 is a face that a change of -3 hides; one of 230 cannot be hidden at R_p = 3.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffprivacy.methods import detector_hiding as dh
from diffprivacy.guidance.face.anchors import AnchorScores, AttackTarget
from diffprivacy.guidance.face.base import Face
from diffprivacy.guidance.face.mtcnn import nms


class ToyDetector(AttackTarget):
    name = "toy"
    min_face = 16

    def __init__(self):
        self.calls = 0

    def _logits(self, x255):
        m = F.avg_pool2d(x255.mean(1, keepdim=True), 16, 16)[0, 0]
        ys, xs = torch.meshgrid(torch.arange(m.shape[0]), torch.arange(m.shape[1]), indexing="ij")
        boxes = torch.stack([xs, ys, xs + 1, ys + 1], -1).reshape(-1, 4).float() * 16
        return boxes, ((m - 200.0) / 2.0).reshape(-1)

    def detect(self, image):
        self.calls += 1
        boxes, z = self._logits(image.permute(2, 0, 1)[None] * 255.0)
        keep = torch.sigmoid(z) > 0.5
        b, s = boxes[keep], torch.sigmoid(z[keep])
        return [Face(b[i], torch.zeros(5, 2), float(s[i])) for i in nms(b, s, 0.3).tolist()]

    def anchor_scores(self, x255, focus=None):
        boxes, z = self._logits(x255)
        return [AnchorScores("toy", boxes, z, 0.5)]


def _scene(values=((16, 16, 201.0), (64, 64, 210.0)), size=96):
    img = torch.full((size, size, 3), 100.0)
    for y, x, v in values:
        img[y:y + 16, x:x + 16] = v
    return img / 255.0


def test_private_face_is_hidden_and_kept_face_stays_detected_within_the_range():
    img = _scene()
    toy = ToyDetector()
    faces = toy.detect(img)
    private = [i for i, f in enumerate(faces) if float(f.box[0]) == 16.0]
    r = dh.hide_from_detectors(img, [toy], "indices", private,
                               settings=dh.HideSettings(max_range=3.0, epsilon=0.25, step="sign"))
    assert r.hidden == {"toy": [True]} and r.kept_found == {"toy": [True]} and r.success
    after = toy.detect(r.image)
    assert len(after) == 1 and float(after[0].box[0]) == 64.0
    d = r.delta
    assert d.abs().max() <= 3.0 and torch.equal(d, d.round())            # on the 8-bit grid, within R_p
    assert torch.equal(r.image * 255, (r.image * 255).round())
    # only the private face's pixels moved: sign steps never touch pixels the loss does not depend on
    assert d[:16].abs().max() == 0 and d[40:].abs().max() == 0 and d[16:32, 16:32].abs().min() > 0


def test_stops_as_soon_as_every_private_face_is_gone_or_after_the_polish():
    s = dict(epsilon=0.5, max_range=20.0, iterations=200, check_every=1, step="sign")
    r = dh.hide_from_detectors(_scene(), [ToyDetector()], "all", settings=dh.HideSettings(polish=0, **s))
    assert r.iterations_to_hide is not None and r.iterations == r.iterations_to_hide < 60
    r = dh.hide_from_detectors(_scene(), [ToyDetector()], "all", settings=dh.HideSettings(polish=7, **s))
    assert r.iterations == r.iterations_to_hide + 7 and r.success


def test_detectors_run_only_once_no_private_anchor_fires_on_the_saved_image_or_every_eighth_check():
    """A face that stays out of reach fires in every pass: the detector runs for the faces at the start, every
    8th check (iterations 8, 16) and after the last step, not at each of the 20 checks. A reachable face is
    still caught at the first step whose saved image hides it (check_every 1)."""
    toy = ToyDetector()
    r = dh.hide_from_detectors(_scene(((16, 16, 250.0),)), [toy], "all",
                               settings=dh.HideSettings(max_range=3.0, iterations=20, check_every=1, step="sign"))
    assert r.hidden == {"toy": [False]} and toy.calls == 1 + 3   # (sign steps: no second try, see below)
    toy = ToyDetector()
    r = dh.hide_from_detectors(_scene(((16, 16, 204.0),)), [toy], "all",
                               settings=dh.HideSettings(epsilon=0.5, max_range=20.0, iterations=40, check_every=1,
                                                        polish=0, step="sign"))
    # after 7 steps of 0.5 the face is 200.5, saved as 200 (round half to even): logit 0, p = 0.5, not a face;
    # the float image still fires there, the saved one does not, and it is the saved one that is checked
    assert r.iterations_to_hide == 7 and toy.calls == 2


def test_a_face_that_hid_stops_moving_while_a_harder_one_is_still_pushed():
    """Per-face stop: the face of 201 is gone after 2 steps of 0.5 and stops there; the one of 215 needs 30 steps.
    Without it both faces move together until the harder one hides (the easy one by -15 as well)."""
    img = _scene(((16, 16, 201.0), (64, 64, 215.0)))
    r = dh.hide_from_detectors(img, [ToyDetector()], "all", settings=dh.HideSettings(
        epsilon=0.5, max_range=20.0, iterations=100, check_every=1, polish=0, step="sign"))
    assert r.hidden == {"toy": [True, True]} and r.success
    easy, hard = r.delta[16:32, 16:32], r.delta[64:80, 64:80]
    assert easy.abs().max() <= 1 and hard.abs().min() >= 15, (easy.abs().max(), hard.abs().min())


def test_ssim_loss_is_the_evaluations_ssim_exactly_and_its_gradient_is_autograds():
    """The polish steps down ``ssim_loss``: it must be the metric the README reports (1 - mean SSIM over the valid
    windows, per channel), not a look-alike, on a real photo and a perturbation of it."""
    from conftest import shared_path
    from face_fixtures import load_photo
    from diffprivacy.evaluation.pixel_metrics import ssim
    img = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))[:200, :150]
    noisy = (img + 0.03 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    x, y = (t.permute(2, 0, 1)[None] * 255 for t in (noisy, img))
    windows = 3 * (200 - 10) * (150 - 10)
    assert abs(float(dh.ssim_loss(x, y)) / windows - (1 - float(ssim(noisy, img)[0]))) < 1e-4   # float32 sums
    assert float(dh.ssim_loss(y, y)) < 1e-3
    x = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dh.ssim_loss(t, y[..., :20, :20].double()),
                                    (x[..., :20, :20].detach().clone().requires_grad_(True),))


def test_change_weight_makes_dark_and_flat_pixels_dear_and_bright_textured_ones_cheap():
    """w = 1 / (1 / (2 var + C2) + 1 / (2 mu^2 + C1)): at the same (zero) variance a dark patch weighs less than a
    bright one (its changes are one-sided and SSIM's luminance term sees them); at the same mean a textured patch
    weighs more than a flat one."""
    x = torch.zeros(1, 3, 64, 96)
    x[..., :, :32] = 5.0                                     # dark, flat
    x[..., :, 32:64] = 180.0                                 # bright, flat
    x[..., :, 64:] = 180.0 + 40.0 * (torch.arange(32) % 2 * 2 - 1)   # bright, textured (var 1600)
    w = dh.change_weight(x)[0, 0, 32]
    dark, bright, textured = float(w[16]), float(w[48]), float(w[80])
    assert dark < 0.55 * bright and textured > 20 * bright, (dark, bright, textured)
    assert abs(bright - 1 / (1 / dh.SSIM_C2 + 1 / (2 * 180.0 ** 2 + dh.SSIM_C1))) < 1e-2 * bright


def test_a_flat_face_the_ssim_step_moves_too_slowly_recruits_more_pixels_over_the_second_half():
    """A flat face of 215 (needs -15 everywhere): the SSIM-shaped step moves little where nothing hides a change (its
    edges, where the variance is, take the full steps); from iteration 50 on the percentile that takes full steps
    falls from the 90th towards the median and the interior follows: hidden at 91 (the 90th throughout: not by 100)."""
    r = dh.hide_from_detectors(_scene(((64, 64, 215.0),)), [ToyDetector()], "all", settings=dh.HideSettings(
        epsilon=0.5, max_range=20.0, iterations=100, check_every=1, step="ssim"))
    assert r.hidden == {"toy": [True]} and 50 < r.iterations_to_hide < 100, r.log[-2:]


def test_a_face_the_shaped_step_leaves_found_gets_a_second_try_with_sign_steps_and_says_so():
    """The flat face of 215 within 40 iterations: the SSIM-shaped step (its interior moves slowly) leaves it found;
    hiding comes first, so the attack tries again with sign steps, returns that hidden result (verified by the
    detector on the saved image) and says so in its note and log."""
    img = _scene(((64, 64, 215.0),))
    s = dict(epsilon=0.5, max_range=20.0, iterations=40, check_every=1, polish=0)
    sign = dh.hide_from_detectors(img, [ToyDetector()], "all", settings=dh.HideSettings(step="sign", **s))
    assert sign.hidden == {"toy": [True]} and sign.note == ""   # sign steps alone: hidden, no second try
    r = dh.hide_from_detectors(img, [ToyDetector()], "all", settings=dh.HideSettings(**s))
    assert r.hidden == {"toy": [True]} and not ToyDetector().detect(r.image)
    assert "second try, with sign steps" in r.note and any("second try" in line for line in r.log)
    assert torch.equal(r.delta, sign.delta)   # the second try is the sign attack itself


def test_a_face_out_of_range_is_reported_not_hidden():
    r = dh.hide_from_detectors(_scene(((16, 16, 250.0),)), [ToyDetector()], "all",
                               settings=dh.HideSettings(max_range=3.0, iterations=20))
    assert r.hidden == {"toy": [False]} and "not every private face could be hidden" in r.note
    assert r.delta.abs().max() <= 3.0


def test_no_face_returns_the_image_unchanged_with_a_note():
    img = torch.rand(64, 64, 3) * 0.5
    r = dh.hide_from_detectors(img, [ToyDetector()], "all")
    assert "no face" in r.note and r.iterations == 0
    assert torch.allclose(r.image, (img * 255).round() / 255)


def test_a_mask_covering_no_face_changes_nothing():
    img = _scene()
    mask = torch.zeros(96, 96)
    mask[0:10, 80:96] = 1.0
    r = dh.hide_from_detectors(img, [ToyDetector()], "mask", mask=mask)
    assert "covers none of the faces" in r.note and r.delta.abs().max() == 0
    mask[16:32, 16:32] = 1.0
    assert dh.hide_from_detectors(img, [ToyDetector()], "mask", mask=mask).hidden == {"toy": [True]}


def _f(x, size):
    return Face(torch.tensor([x, 0.0, x + size, size]), torch.zeros(5, 2), 0.99)


def test_choose_private_modes():
    faces = [_f(0, 80), _f(100, 50), _f(200, 20)]
    assert dh.choose_private(faces, "all") == ([0, 1, 2], [])
    assert dh.choose_private(faces, "largest") == ([0], [1, 2])
    assert dh.choose_private(faces, "indices", [2, 1, 2]) == ([1, 2], [0])
    mask = torch.zeros(100, 300)
    mask[:, 95:160] = 1
    assert dh.choose_private(faces, "mask", mask=mask) == ([1], [0, 2])
    with pytest.raises(ValueError, match=r"indices \[5\] are out of range: 3 face"):
        dh.choose_private(faces, "indices", [5])
    with pytest.raises(ValueError, match="needs a MASK"):
        dh.choose_private(faces, "mask")


def test_jpeg_in_the_loop_passes_the_gradient_straight_through():
    x = (torch.rand(1, 3, 32, 32) * 255).requires_grad_(True)
    y = dh.transform(x, 1.0, 80)
    assert not torch.equal(y.detach(), x.detach())                        # JPEG really changed it
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(g))                              # BPDA: identity backward


def test_robust_mode_hides_after_jpeg_and_rescale_too():
    toy = ToyDetector()
    img = _scene(((32, 32, 205.0),), size=128)
    s = dh.HideSettings(max_range=12.0, epsilon=1.0, iterations=60, robust=True)
    r = dh.hide_from_detectors(img, [toy], "all", settings=s)
    assert r.hidden == {"toy": [True]}
    x = (r.image.permute(2, 0, 1)[None] * 255)
    for scale, q in ((1.0, 75), (1.0, 95), (0.9, None), (1.1, None)):
        y = dh.transform(x, scale, q).round().clamp(0, 255)
        assert not any(float(f.box[0]) < 64 * scale for f in toy.detect(y[0].permute(1, 2, 0) / 255)), (scale, q)


def test_settings_refuse_a_step_larger_than_the_range():
    with pytest.raises(ValueError, match="larger than the range"):
        dh.HideSettings(epsilon=4, max_range=3)
    with pytest.raises(ValueError, match="region must be 0"):   # a region smaller than the face box itself
        dh.HideSettings(region=0.5)


# -- the node: bad input --------------------------------------------------------------------------

def _node():
    from diffprivacy.nodes.detector_nodes import DiffPrivacyHideFromDetectors
    return DiffPrivacyHideFromDetectors()


def _run(node, image, **kw):
    args = dict(detectors="mtcnn", private_faces="all", face_indices="0", range_rp=3.0, epsilon=0.25,
                iterations=4, robust=False, max_megapixels=12.0)
    args.update(kw)
    with torch.inference_mode():   # as ComfyUI runs nodes
        out = node.hide(image, **args)
    assert out["ui"]["text"][0].startswith("finished: ")  # what the node shows after the run
    return out["result"][:3]


@pytest.mark.parametrize("channels", [1, 4])
def test_node_takes_grayscale_and_rgba_and_passes_a_faceless_image_with_a_note(channels):
    img = torch.rand(1, 48, 40, channels)
    out, delta, report = _run(_node(), img)
    assert out.shape == (1, 48, 40, 3) and delta.shape == out.shape
    rep = json.loads(report)
    assert rep[0]["faces"] == 0 and "no face" in rep[0]["note"] and "20 px" in rep[0]["note"]
    rgb = img[..., :3] if channels == 4 else img.expand(-1, -1, -1, 3)
    assert torch.allclose(out, (rgb * 255).round() / 255)


def test_node_ends_with_a_progress_line_saying_it_finished_not_the_last_iteration(monkeypatch):
    from diffprivacy.nodes import common
    lines = []
    monkeypatch.setattr(common, "send_progress_text", lambda text, node_id: lines.append(text))
    face = torch.rand(1, 48, 40, 3)
    with torch.inference_mode():
        out = _node().hide(face, detectors="mtcnn", private_faces="all", face_indices="0", range_rp=3.0,
                           epsilon=0.25, iterations=4, robust=False, max_megapixels=12.0, unique_id="7")
    assert lines and lines[-1] == out["ui"]["text"][0]
    assert lines[-1].startswith("finished: 0 of 0 private face(s) hidden") and "no face" in lines[-1]


def test_node_refuses_a_4096_square_image_with_the_reason_and_a_memory_estimate():
    img = torch.zeros(1, 4096, 4096, 3)
    with pytest.raises(ValueError, match=r"4096x4096 \(16\.8 MP\).*about [0-9.]+ GiB"):
        _run(_node(), img)


def test_node_needs_a_mask_for_mask_mode():
    with pytest.raises(ValueError, match="needs a MASK"):
        _run(_node(), torch.rand(1, 32, 32, 3), private_faces="mask")


# -- MTCNN, real weights, real faces -------------------------------------------------------------

def test_mtcnn_misses_two_private_real_faces_and_still_finds_the_kept_ones():
    """group-8-faces.jpg cropped to three people (faces ~50-60 px wide, as in group photos; MTCNN reports four
    boxes, two of them on the left person): the left person's two boxes are private, the other two faces kept.

    At R_p = 12 (eps 1) MTCNN misses both private boxes and still finds the kept faces; on this tight crop, where
    faces fill most of the picture, SSIM stays above 0.9 (on whole photos the change is a far smaller share).
    At the thesis's R_p = 3 it does not hide them: see the report of issue 12 (MTCNN's cascade with its 0.9 O-Net
    threshold keeps re-proposing faces of this size).
    """
    from conftest import shared_path
    from face_fixtures import load_photo, mtcnn
    from diffprivacy.evaluation.pixel_metrics import ssim
    from diffprivacy.guidance.face.mtcnn_target import MTCNNTarget
    img = load_photo(shared_path("data", "photos", "group-8-faces.jpg"))[100:230, 190:530].contiguous()
    target = MTCNNTarget(mtcnn())
    faces = target.detect(img)
    assert len(faces) == 4
    r = dh.hide_from_detectors(img, [target], "indices", [0, 1],
                               settings=dh.HideSettings(max_range=12.0, epsilon=1.0, iterations=40))
    assert r.hidden == {"mtcnn": [True, True]} and r.kept_found == {"mtcnn": [True, True]}, r.log
    assert r.delta.abs().max() <= 12.0
    assert float(ssim(img, r.image)[0]) >= 0.9
    assert len(target.detect(r.image)) == 2


def test_after_reupload_detects_on_the_changed_image_and_maps_boxes_back():
    """The survival check must really re-encode / rescale what the detector sees, and report boxes in the
    original's pixels (a bug in either would make every hidden face look 'robust' or every face 'lost')."""
    from diffprivacy.evaluation.detection import after_reupload
    seen = []

    def spy(image):  # a detector that finds one face over the image's second quarter, whatever its size
        seen.append(image)
        h, w = image.shape[:2]
        return [Face(torch.tensor([0.25 * w, 0.25 * h, 0.5 * w, 0.5 * h]), torch.zeros(5, 2), 0.99)]

    img = _scene()
    checker = (torch.arange(96)[:, None] + torch.arange(96)[None, :]) % 2
    img = img + (checker[..., None] * 6.0 - 3.0) / 255.0   # texture JPEG cannot keep exactly (flat blocks it can)
    for scale, quality in ((1.0, 75), (1.1, None), (0.9, 95)):
        seen.clear()
        (found,) = after_reupload(spy, scale, quality)(img)
        (shown,) = seen
        assert shown.shape[0] == round(96 * scale)
        if scale == 1.0:
            assert (shown - img).abs().max() > 2 / 255   # JPEG changed the pixels the detector saw
        assert torch.allclose(found.box, torch.tensor([24.0, 24.0, 48.0, 48.0]), atol=0.6), (scale, found.box)


def test_region_keeps_every_change_near_the_private_faces_and_they_still_hide():
    """Real MTCNN on the astronaut (512 px): with region 1.2 nothing outside 1.2 x the face's box changes and the
    face is still hidden; unrestricted (region 0, the thesis) the attack also changes pixels far from the face."""
    from conftest import shared_path
    from face_fixtures import load_photo, mtcnn
    from diffprivacy.guidance.face.mtcnn_target import MTCNNTarget
    img = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))
    target = MTCNNTarget(mtcnn())
    (face,) = target.detect(img)
    outside = dh.region_mask(face.box[None], 1.2, *img.shape[:2])[0, 0] == 0
    near = dh.hide_from_detectors(img, [target], "all", settings=dh.HideSettings(region=1.2))
    assert near.hidden == {"mtcnn": [True]}
    assert near.delta[outside].abs().max() == 0 and near.delta[~outside].abs().max() > 0
    anywhere = dh.hide_from_detectors(img, [target], "all", settings=dh.HideSettings(region=0, step="sign"))
    assert anywhere.delta[outside].abs().amax(-1).gt(0).float().mean() > 0.2   # a fifth of the far pixels moved


# -- behind the method contract ---------------------------------------------------------------------------------

def test_the_method_contract_runs_each_photo_of_a_batch_at_its_size_with_steps_and_the_private_faces_plan():
    """Hide from Detectors is a full-size Method: contract.protect gives it each photo whole, and it returns the photo
    on the 8-bit grid, its report, its perturbation and the plan of its private faces (the receipt's faces); progress
    arrives as Steps only, one photo after the other."""
    import dataclasses

    from diffprivacy.guidance.progress import Step
    from diffprivacy.methods import contract
    photos = torch.stack([_scene(), _scene(((48, 32, 205.0),))])
    steps = []
    settings = dh.DetectorHidingSettings(attack=dh.HideSettings(max_range=20.0, epsilon=0.5, iterations=100,
                                                                check_every=1))
    delivery = contract.protect(photos, dh.METHOD, contract.Models(extra={"targets": [ToyDetector()]}), settings,
                                resolution=0, progress=steps.append, receipt=False)
    assert delivery.images.shape == photos.shape and not delivery.failures
    for i, d in enumerate(delivery.delivered):
        report = d.result.faces[0].report
        assert report["image"] == i and report["private_hidden"]["toy"] and all(report["private_hidden"]["toy"])
        assert [c.face_index for c in d.plan.crops] == report["private"] and d.plan.mode == "full size"
        assert torch.equal(d.images[0], (d.images[0] * 255).round() / 255)   # as saved
        assert torch.equal(d.result.faces[0].parts["delta"], ((d.images[0] - (photos[i] * 255).round() / 255)
                                                               * 255).round())
    assert steps and all(type(s) is Step and s.total == 2 * 100 for s in steps)
    assert max(s.done for s in steps) > 100   # the second photo's steps come after the first's
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.attack.max_range = 3.0      # validated once, when built: nothing changes it afterwards


def test_detector_hiding_settings_refuse_a_mask_choice_without_a_mask_and_a_mask_of_another_size():
    with pytest.raises(ValueError, match="needs a MASK"):
        dh.DetectorHidingSettings("mask")
    with pytest.raises(ValueError, match="face indices must be whole numbers"):
        dh.DetectorHidingSettings("indices", (-1,))
    with pytest.raises(ValueError, match=r"the mask is \(32, 32\) but the image is \(96, 96\)"):
        dh.DetectorHidingSettings("mask", mask=torch.ones(1, 32, 32)).mask_for(0, 96, 96)


def test_ssim_step_hides_a_real_face_from_mtcnn_with_a_higher_ssim_than_sign_steps():
    """The astronaut (512 px), real MTCNN, defaults otherwise: sign steps (the thesis) move every pixel the loss
    reads by epsilon, flat skin included; the SSIM-shaped step moves most where the local variance hides a change.
    Both hide the face on the saved image (the verdict is MTCNN's on it); the SSIM-shaped one loses under 0.6x the
    SSIM."""
    from conftest import shared_path
    from face_fixtures import load_photo, mtcnn
    from diffprivacy.evaluation.pixel_metrics import ssim
    from diffprivacy.guidance.face.mtcnn_target import MTCNNTarget
    img = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))
    target = MTCNNTarget(mtcnn())
    out = {}
    for step in ("sign", "ssim"):
        r = dh.hide_from_detectors(img, [target], "all", settings=dh.HideSettings(step=step, polish=0))
        assert r.hidden == {"mtcnn": [True]}, (step, r.log[-2:])
        out[step] = float(ssim(img, r.image)[0])
    assert 1 - out["ssim"] < 0.6 * (1 - out["sign"]), out   # measured: 0.9987 vs 0.9971
    # the polish (default 40 iterations): SSIM's own gradient where the face is gone, the face still hidden
    r = dh.hide_from_detectors(img, [target], "all", settings=dh.HideSettings())
    assert r.hidden == {"mtcnn": [True]}, r.log[-2:]
    assert not target.detect(r.image)
    out["polished"] = float(ssim(img, r.image)[0])
    assert 1 - out["polished"] < 0.8 * (1 - out["ssim"]), out


class WideToy(ToyDetector):
    """A second detector that reads a face with context: its face logit per 16-px cell is the mean of the 48x48
    window centred on that cell (minus a threshold), so a face it finds is hidden from it only by changing pixels
    well outside the face box."""
    name = "wide"
    THRESHOLD = 152.67

    def _logits(self, x255):
        m = F.avg_pool2d(x255.mean(1, keepdim=True), 48, 16, padding=16, count_include_pad=False)[0, 0]
        ys, xs = torch.meshgrid(torch.arange(m.shape[0]), torch.arange(m.shape[1]), indexing="ij")
        boxes = torch.stack([xs, ys, xs + 1, ys + 1], -1).reshape(-1, 4).float() * 16
        return boxes, (m - self.THRESHOLD).reshape(-1)

    def anchor_scores(self, x255, focus=None):
        boxes, z = self._logits(x255)
        return [AnchorScores("wide", boxes, z, 0.5)]


def test_a_face_the_first_detector_lost_but_another_still_finds_may_change_pixels_beyond_its_box():
    """The face (16 px, value 201) in a band of 150: the toy loses it at once, the wide detector (window mean 155.7,
    threshold 152.7) only when the band changes too. Within 1.2x the box (region_other = region) R_p 12 moves the
    window's mean by 1.3 at most: still found. With region_other 2 it hides from both; nothing beyond 2x moves."""
    img = torch.full((96, 96, 3), 100.0)
    img[16:64, 16:64] = 150.0
    img[32:48, 32:48] = 201.0
    img = img / 255.0
    targets = [ToyDetector(), WideToy()]
    assert [len(t.detect(img)) for t in targets] == [1, 1]
    s = dict(max_range=12.0, epsilon=0.5, iterations=120, check_every=1, step="sign")
    tight = dh.hide_from_detectors(img, targets, "all", settings=dh.HideSettings(region_other=1.2, **s))
    assert tight.hidden["toy"] == [True] and not all(tight.hidden["wide"])   # wide: the toy's box and its own
    for bad in (float("nan"), float("inf"), 0.5):
        with pytest.raises(ValueError, match="region_other"):
            dh.HideSettings(region_other=bad, **s)
    wide = dh.hide_from_detectors(img, targets, "all", settings=dh.HideSettings(**s))
    assert wide.hidden["toy"] == [True] and all(wide.hidden["wide"])
    d = wide.delta.abs().amax(-1)
    assert d[24:56, 24:56].amax() > 0 and d[:24].amax() == 0 and d[56:].amax() == 0   # within 2x the box only
    assert d[:, :24].amax() == 0 and d[:, 56:].amax() == 0
