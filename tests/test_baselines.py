"""Blur, pixelation and mosaic on faces-13id against dlib: stronger settings protect more faces
and cost more PSNR/SSIM; the baseline nodes on real and face-less images."""
from __future__ import annotations

import functools

import pytest
import torch

from face_fixtures import dlib_faces13, dlib_model, faces13_image
from diffprivacy.evaluation.analysis import embed_at
from diffprivacy.evaluation.baselines import PRESETS, apply_baseline
from diffprivacy.evaluation.identity import identity_distance
from diffprivacy.evaluation.pixel_metrics import all_pixel_metrics
from diffprivacy.guidance.face.base import NoFaceError
from diffprivacy.nodes.baseline_nodes import (NODE_CLASS_MAPPINGS, DiffPrivacyBlurFaces, DiffPrivacyMosaicFaces,
                                              DiffPrivacyPixelateFaces)


MAX_SIDE = 640  # metrics cost grows with pixels; faces stay >= 100 px


@functools.lru_cache(maxsize=None)
def baseline_scores():
    """method -> level -> (SR at the original's alignment, mean PSNR, mean SSIM) over one photo per
    person (each shrunk to MAX_SIDE, its dlib landmarks scaled along)."""
    analyses, labels = dlib_faces13()
    first = {}
    for name in sorted(labels, key=lambda n: int(n[3:-4])):
        first.setdefault(labels[name], name)
    model = dlib_model()
    scores = {m: {} for m in PRESETS}
    for name in first.values():
        a = analyses[name]
        img = faces13_image(name)
        s = min(1.0, MAX_SIDE / max(img.shape[:2]))
        size = (round(img.shape[0] * s), round(img.shape[1] * s))
        img = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
        lm = (a.landmarks + 0.5) * s - 0.5
        ref = embed_at(model, img, lm)
        for method, levels in PRESETS.items():
            for level, strength in levels.items():
                out, _ = apply_baseline(img, [a.boxes[0] * s], method, strength)
                d = identity_distance(model, ref, embed_at(model, out, lm))
                px = all_pixel_metrics(img, out)
                scores[method].setdefault(level, []).append((d >= model.threshold, px["psnr"], px["ssim"]))
    return {m: {lv: tuple(sum(v[k] for v in rows) / len(rows) for k in range(3)) for lv, rows in levels.items()}
            for m, levels in scores.items()}


@pytest.mark.parametrize("method", list(PRESETS))
def test_stronger_baselines_protect_more_and_cost_more_quality(method):
    s = baseline_scores()[method]
    weak, medium, strong = s["weak"], s["medium"], s["strong"]
    assert weak[0] <= medium[0] <= strong[0], s            # protection success rate rises
    assert strong[0] >= 0.75 and strong[0] > weak[0], s    # a copy scores 0 (test_eval_faces13)
    assert weak[1] > medium[1] > strong[1], s              # PSNR falls
    assert weak[2] > medium[2] > strong[2], s              # SSIM falls


def test_baseline_nodes_cover_faces_and_pass_or_refuse_faceless_images():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("DiffPrivacy")
        for section in cls.INPUT_TYPES().values():
            assert all(spec[1].get("tooltip") for spec in section.values()), node_id
    model = dlib_model()
    img = faces13_image("img12.jpg")[None]
    noise = torch.rand(1, *img.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for node, strength in ((DiffPrivacyBlurFaces(), 10.0), (DiffPrivacyPixelateFaces(), 6)):
            out, mask = node.apply(model, torch.cat([img, noise]), strength, 0.2, "all", "pass through")
            assert out.shape == (2, *img.shape[1:]) and mask.shape == (2, *img.shape[1:3])
            assert 0.05 < float(mask[0].mean()) < 0.8 and not torch.equal(out[0], img[0])
            assert torch.equal(out[1], noise[0]) and mask[1].sum() == 0
        out, _ = DiffPrivacyMosaicFaces().apply(model, img, 16.0, 0.2, "largest", "error", 3)
        assert not torch.equal(out, img)
        with pytest.raises(NoFaceError):
            DiffPrivacyMosaicFaces().apply(model, noise, 16.0, 0.2, "all", "error", 0)
