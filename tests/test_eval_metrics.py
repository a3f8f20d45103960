"""Pixel metrics, image reading, folder pairing, identities files, the identification protocol,
LPIPS lookup and the baseline filters: plain functions, no face model (fast)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import shared_path
from diffprivacy.evaluation import baselines, identity, images, lpips, pixel_metrics
from diffprivacy.evaluation.report import load_identities


@pytest.fixture(scope="module")
def photo():
    return images.load_image(shared_path("data", "photos", "obama.jpg"))


def test_copy_has_infinite_psnr_zero_error_and_ssim_one(photo):
    m = pixel_metrics.all_pixel_metrics(photo, photo.clone())
    assert m["psnr"] == math.inf and m["mse"] == 0 and m["mae"] == 0 and m["rmse"] == 0
    assert m["ssim"] == pytest.approx(1.0, abs=1e-9)


def test_psnr_of_known_error_and_batched_values():
    a = torch.zeros(2, 16, 16, 3)
    b = a.clone()
    b[0] += 0.1                      # MSE 0.01 -> 20 dB
    b[1, :8] += 0.5                  # half the pixels off by 0.5 -> MSE 0.125
    assert pixel_metrics.psnr(a, b).tolist() == pytest.approx([20.0, 10 * math.log10(8)])
    assert pixel_metrics.mae(a, b).tolist() == pytest.approx([0.1, 0.25])
    with pytest.raises(ValueError, match="same shape"):
        pixel_metrics.mse(a, b[:, :8])


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Independent SSIM (scipy's Gaussian filter, radius 5 as the 11-tap window, valid region)."""
    from scipy.ndimage import gaussian_filter
    vals = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        f = lambda t: gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))
        vals.append(s.mean())
    return float(np.mean(vals))


def test_ssim_matches_an_independent_implementation_and_falls_with_noise(photo):
    crop = photo[100:300, 350:600]
    g = torch.Generator().manual_seed(0)
    weak = (crop + 0.03 * torch.randn(crop.shape, generator=g)).clamp(0, 1)
    strong = (crop + 0.15 * torch.randn(crop.shape, generator=g)).clamp(0, 1)
    s_weak = float(pixel_metrics.ssim(crop, weak)[0])
    assert s_weak == pytest.approx(_ssim_reference(crop.numpy(), weak.numpy()), abs=1e-4)  # float32 filtering
    assert 1.0 > s_weak > float(pixel_metrics.ssim(crop, strong)[0]) > 0.0


def test_load_image_converts_rgba_grayscale_and_16_bit(tmp_path):
    from PIL import Image
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((20, 30), 51, np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    a = images.load_image(tmp_path / "rgba.png")
    assert a.shape == (20, 30, 3) and a[0, 0].tolist() == pytest.approx([200 / 255, 0, 0])
    assert images.load_image(tmp_path / "gray.png")[5, 5].tolist() == pytest.approx([0.2] * 3)
    assert images.load_image(tmp_path / "deep.png")[5, 5].tolist() == pytest.approx([32768 / 65535] * 3, abs=1e-6)
    with pytest.raises(ValueError, match="broken.jpg"):
        images.load_image(tmp_path / "broken.jpg")


def test_pair_names_by_name_then_stem():
    orig = {n: n for n in ("a.jpg", "b.jpg", "c.jpg")}
    other = {n: n for n in ("a.jpg", "b.png", "x.png")}
    pairs, missing, extra = images.pair_names(orig, other)
    assert pairs == {"a.jpg": "a.jpg", "b.jpg": "b.png"} and missing == ["c.jpg"] and extra == ["x.png"]


def test_identities_file_layouts(tmp_path):
    p = tmp_path / "ids.json"
    p.write_text(json.dumps({"identities": [["a.jpg", "b.jpg"], ["c.jpg"]]}))
    assert load_identities(p) == {"a.jpg": "id0", "b.jpg": "id0", "c.jpg": "id1"}
    p.write_text(json.dumps({"ann": ["a.jpg"], "ben": ["c.jpg"]}))
    assert load_identities(p) == {"a.jpg": "ann", "c.jpg": "ben"}
    p.write_text(json.dumps({"a.jpg": "ann"}))
    assert load_identities(p) == {"a.jpg": "ann"}
    p.write_text("{}")
    with pytest.raises(ValueError, match="no identities"):
        load_identities(p)


class _L2:
    metric, threshold = "l2", 0.5

    def distance(self, a, b):
        return (a - b).norm(dim=1)


def test_identification_protocol_counts_pairs_beaten_by_an_impostor():
    # person A: three photos on the x axis; person B's photo sits near A's first photo only
    orig = {"a1": torch.tensor([0.0, 0.0]), "a2": torch.tensor([1.0, 0.0]), "a3": torch.tensor([0.2, 0.0]),
            "b1": torch.tensor([0.0, 0.5]), "b2": torch.tensor([0.0, 0.6])}
    labels = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B"}
    acc, pairs = identity.leave_one_out_identification(_L2(), orig, orig, labels)
    # probes a1: a2 (1.0) loses to b1 (0.5), a3 wins; a2: both win (b nearest 1.118); a3: a2 (0.8) loses to
    # b1 (0.539), a1 wins; b1: b2 (0.1) wins; b2: b1 wins -> 6 of 8 pairs
    assert pairs == 8 and acc == pytest.approx(6 / 8)
    # "encrypted" a3 far from everything: the two pairs it won (probes a1, a2) are lost
    moved = dict(orig, a3=torch.tensor([5.0, 5.0]))
    acc2, _ = identity.leave_one_out_identification(_L2(), orig, moved, labels)
    assert acc2 == pytest.approx(4 / 8)


def test_protection_outcome_and_rate():
    m = _L2()
    o = torch.tensor([0.0, 0.0])
    assert identity.protection_outcome(m, o, torch.tensor([0.1, 0.0])) is False
    assert identity.protection_outcome(m, o, torch.tensor([0.5, 0.0])) is True   # at the threshold: not matched
    assert identity.protection_outcome(m, o, torch.tensor([0.3, 0.0]), threshold=0.2) is True
    assert identity.protection_success_rate([True, False, True, True]) == 0.75
    assert math.isnan(identity.protection_success_rate([]))


def test_an_undetected_protected_face_is_not_counted_as_protected_unless_difp_eq23_is_chosen():
    m, o = _L2(), torch.tensor([0.0, 0.0])
    assert identity.protection_outcome(m, o, None) is None                                   # §3.1.1: no outcome
    assert identity.protection_outcome(m, o, None, identity.UNDETECTED_PROTECTED) is True    # DIFP Eq. 23
    outcomes = [True, False, identity.protection_outcome(m, o, None)]
    assert identity.protection_success_rate(outcomes) == 0.5  # over the faces detected
    assert math.isnan(identity.protection_success_rate([None, None]))
    with pytest.raises(ValueError, match="undetected must be one of"):
        identity.protection_outcome(m, o, None, "ignored")


def test_arcface_rates_are_given_at_the_calibrated_threshold_and_the_papers_l2_08():
    class ArcFace:
        name, metric, threshold = "arcface-r50+scrfd", "cosine", 0.68
    labels = identity.rate_thresholds(ArcFace())
    (calibrated, t1), (paper, t2) = labels.items()
    assert t1 == 0.68 and calibrated.startswith("calibrated: cosine distance 0.68")
    assert t2 == pytest.approx(0.32) and "0.8 as L2 between unit embeddings = cosine similarity 0.68" in paper
    a = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert float((a[0] - a[1]).norm()) ** 2 == pytest.approx(2 * float(1 - a[0] @ a[1]))  # L2^2 = 2 - 2 cos
    assert list(identity.rate_thresholds(_L2())) == ["calibrated: L2 0.5"]  # other recognizers: one threshold


def test_identification_counts_an_undetected_protected_face_as_not_identified_and_uses_external_distractors():
    orig = {"a1": torch.tensor([0.0, 0.0]), "a2": torch.tensor([1.0, 0.0]), "a3": torch.tensor([0.2, 0.0]),
            "b1": torch.tensor([0.0, 0.5]), "b2": torch.tensor([0.0, 0.6])}
    labels = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B"}
    # 6 of 8 pairs with the originals (see above); a3's face not detected: its two winning pairs are lost
    acc, pairs = identity.leave_one_out_identification(_L2(), orig, dict(orig, a3=None), labels)
    assert (acc, pairs) == (pytest.approx(4 / 8), 8)
    # an external distractor nearer to b1 than b2 is: the pair (b1, b2) is lost, nothing else changes
    gallery = torch.tensor([[0.0, 0.45], [9.0, 9.0]])
    acc, pairs = identity.leave_one_out_identification(_L2(), orig, orig, labels, gallery)
    assert (acc, pairs) == (pytest.approx(5 / 8), 8)
    # one person only: without a gallery nothing can be measured; with it, every pair counts
    only_a = {n: orig[n] for n in ("a1", "a2", "a3")}
    assert identity.leave_one_out_identification(_L2(), only_a, only_a, labels)[1] == 0
    acc, pairs = identity.leave_one_out_identification(_L2(), only_a, only_a, labels, gallery)
    assert pairs == 6 and acc == pytest.approx(4 / 6)  # a1 -> a2 (1.0) and a3 -> a2 (0.8) lose to (0, 0.45)


def test_lpips_is_reported_absent_and_computes_from_files(tmp_path):
    with pytest.raises(lpips.LPIPSUnavailable, match="alex.pth"):
        lpips.load_lpips([tmp_path])
    g = torch.Generator().manual_seed(0)
    backbone = {}
    for idx, cin, cout, k, _, _ in lpips._CONVS:
        backbone[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.05
        backbone[f"features.{idx}.bias"] = torch.zeros(cout)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    model = lpips.load_lpips([tmp_path])
    x = torch.rand(64, 64, 3, generator=g)
    assert model.distance(x, x) == 0.0
    assert model.distance(x, torch.rand(64, 64, 3, generator=g)) > model.distance(x, (x + 0.02).clamp(0, 1)) > 0


def test_baselines_change_only_the_region_and_grow_stronger(photo):
    box = torch.tensor([400.0, 150.0, 600.0, 350.0])
    region = baselines.face_region(box, photo.shape[:2], 0.2)
    assert region == (360, 110, 640, 390)
    inside = (slice(region[1], region[3]), slice(region[0], region[2]))
    for method, levels in baselines.PRESETS.items():
        psnrs = []
        for level in ("weak", "medium", "strong"):
            out, mask = baselines.apply_baseline(photo, [box], method, levels[level])
            outside = mask == 0
            assert torch.equal(out[outside], photo[outside]), method
            assert mask[inside].min() == 1 and mask.sum() == (region[2] - region[0]) * (region[3] - region[1])
            psnrs.append(float(pixel_metrics.psnr(photo[inside], out[inside])[0]))
        assert psnrs[0] > psnrs[1] > psnrs[2], (method, psnrs)
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.apply_baseline(photo, [box], "smudge", 1.0)


def test_pixelation_is_blocky_and_mosaic_is_seeded_and_irregular(photo):
    box = torch.tensor([400.0, 150.0, 600.0, 350.0])
    pix, _ = baselines.apply_baseline(photo, [box], "pixelate", 5, margin=0.0)   # 40 px blocks
    assert torch.equal(pix[150:190, 400:440], pix[150:151, 400:401].expand(40, 40, 3))
    m1, _ = baselines.apply_baseline(photo, [box], "mosaic", 20.0, margin=0.0, seed=1)
    m2, _ = baselines.apply_baseline(photo, [box], "mosaic", 20.0, margin=0.0, seed=1)
    m3, _ = baselines.apply_baseline(photo, [box], "mosaic", 20.0, margin=0.0, seed=2)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    tiles = torch.unique(m1[150:350, 400:600].reshape(-1, 3), dim=0).shape[0]
    assert 15 <= tiles <= 40  # about (200 / 40)^2 = 25 tiles, each one flat colour
    assert not torch.equal(m1, pix)
