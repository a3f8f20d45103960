"""DP-Image on the identity embedding (thesis ch. 4): ε against dp-accounting and the closed form, the thesis's own
figure, the released distribution, strict rendering's independence from the original's pixels and its refusal of a
MODEL or CONDITIONING that can carry the original, the privacy label on every output (computed from what went in),
bad input, and the dp-identity workflow in a live server. Renders use the tiny random-weight model and a random-weight
FaceID file (tests/ip_adapter_fixtures.py): they test the plumbing, never image quality."""
from __future__ import annotations

import io
import json
import math
import time

import pytest
import torch

import ip_adapter_fixtures as fx
from conftest import nodes_of
from diffprivacy.guidance import dp_identity as dpi
from diffprivacy.guidance import ip_adapter as ipa
from diffprivacy.guidance.face.base import Detector, Face, FaceModel

# Δ = 2 (unit embeddings, C = 1), δ = 1e-5, one release (spec: wave2-components.md, "Differential privacy accounting")
KNOWN = {1.0: (10.00, 10.73), 2.0: (4.38, 4.73), 4.0: (1.99, 2.17)}  # σ: (analytic / PLD, RDP), 2 decimals


# -- ε -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", sorted(KNOWN))
def test_epsilon_agrees_with_dp_accounting_the_closed_form_and_the_known_values(sigma):
    analytic, rdp = KNOWN[sigma]
    closed = dpi.analytic_gaussian_epsilon(sigma, 2.0, 1e-5)
    library = dpi.epsilon_accountant(sigma, 2.0, 1e-5)
    pld = dpi.epsilon_pld(sigma, 2.0, 1e-5)
    assert closed == pytest.approx(analytic, abs=0.005)
    assert library == pytest.approx(closed, rel=1e-9)
    assert pld == pytest.approx(closed, abs=2e-3)
    assert dpi.epsilon_rdp(sigma, 2.0, 1e-5) == pytest.approx(rdp, abs=0.005)


def test_composition_over_rounds_matches_the_pld_accountant_and_grows_with_the_rounds():
    eps = [dpi.analytic_gaussian_epsilon(2.0, 2.0, 1e-5, t) for t in (1, 2, 3)]
    assert eps[0] < eps[1] < eps[2]
    assert dpi.epsilon_pld(2.0, 2.0, 1e-5, 3) == pytest.approx(eps[2], abs=5e-3)
    assert dpi.epsilon_accountant(2.0, 2.0, 1e-5, 3) == pytest.approx(eps[2], rel=1e-9)
    assert dpi.epsilon_rdp(2.0, 2.0, 1e-5, 3) > eps[2]  # RDP is the looser line


def test_closed_form_delta_at_the_reported_epsilon_is_delta():
    eps = dpi.analytic_gaussian_epsilon(1.0, 2.0, 1e-5)
    assert dpi.analytic_gaussian_delta(eps, 2.0) == pytest.approx(1e-5, rel=1e-6)
    assert dpi.analytic_gaussian_delta(eps * 0.99, 2.0) > 1e-5


@pytest.mark.parametrize("target, rounds", [(4.38, 1), (1.0, 1), (10.0, 5)])
def test_sigma_solved_from_a_target_reaches_exactly_that_epsilon(target, rounds):
    sigma = dpi.sigma_for_epsilon(target, 1e-5, 1.0, rounds)
    assert dpi.analytic_gaussian_epsilon(sigma, 2.0, 1e-5, rounds) == pytest.approx(target, rel=1e-6)
    report = dpi.account(1.0, None, 1e-5, rounds, target_epsilon=target)
    assert report.sigma == pytest.approx(sigma) and report.epsilon == pytest.approx(target, rel=1e-6)
    if (target, rounds) == (4.38, 1):
        assert sigma == pytest.approx(2.0, abs=0.005)


def test_thesis_bound_reproduces_its_own_figure_and_shrinks_where_composition_grows():
    assert dpi.thesis_rdp_bound(3840.0, 0.2, 10 ** 4, 2.0) == pytest.approx(36864.0)
    assert dpi.thesis_dp_bound(3840.0, 0.2, 10 ** 4, 1e-8, 2.0) == pytest.approx(36864.0 + math.log(1e8))
    r1, r10 = dpi.account(1.0, 1.0, 1e-5, 1), dpi.account(1.0, 1.0, 1e-5, 10)
    assert r10.thesis_rdp_epsilon == pytest.approx(r1.thesis_rdp_epsilon / 10)
    assert r10.epsilon > r1.epsilon
    assert "thesis" in r10.text() and "not used" in r10.text()


def test_the_report_shows_epsilon_delta_the_rdp_line_and_the_thesis_bound_labelled():
    r = dpi.account(1.0, 1.0, 1e-5, 1)
    text = r.text()
    assert f"{r.epsilon:.4g}" in text and "1e-05" in text and "RDP accountant" in text
    assert "Thm 4.4.1" in text and f"{r.thesis_rdp_epsilon:.4g}" in text
    assert r.expected_cosine == pytest.approx(1 / math.sqrt(513), rel=1e-9)


# -- the mechanism -----------------------------------------------------------------------------------------------------
def test_released_embeddings_are_distributed_as_gaussian_noise_around_the_clipped_embedding():
    """N = 4000 releases of one embedding of norm 3 (C = 1 clips it to norm 1), σ = 0.5, seed 7, no renormalisation.

    Tolerances: the mean of every coordinate within 5 standard errors (5σ/√N) of clip(x), the pooled variance within
    3% of σ², and all 2 048 000 standardised residuals pass a Kolmogorov-Smirnov test against N(0, 1) at p > 0.01.
    Releasing x unclipped would put every mean 2/√512 ≈ 9 standard errors off.
    """
    from scipy import stats
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 512, generator=g, dtype=torch.float64)
    x = 3.0 * x / x.norm()
    n, sigma = 4000, 0.5
    z = dpi.release(x.expand(n, -1), 1.0, sigma, dpi.seeded(7), renormalize=False).double()
    clipped = x / 3.0
    se = sigma / math.sqrt(n)
    assert (z.mean(0) - clipped[0]).abs().max() < 5 * se
    assert (z - clipped).var() == pytest.approx(sigma ** 2, rel=0.03)
    assert stats.kstest(((z - clipped) / sigma).flatten().numpy(), "norm").pvalue > 0.01


def test_a_renormalised_release_is_a_unit_vector_at_the_expected_cosine_to_the_original():
    x = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=1)
    z = dpi.release(x.expand(500, -1), 1.0, 1.0, dpi.seeded(11), renormalize=True)
    assert torch.allclose(z.norm(dim=1), torch.ones(500), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(z, x.expand(500, -1), dim=1).mean()
    assert float(cos) == pytest.approx(dpi.expected_cosine(1.0, 1.0), abs=0.01)  # ≈ 0.044


def test_noise_seed_zero_draws_fresh_secret_noise_and_a_fixed_seed_repeats():
    x = torch.nn.functional.normalize(torch.ones(1, 512), dim=1)
    assert not torch.equal(dpi.release(x, 1.0, 1.0, dpi.seeded(0)), dpi.release(x, 1.0, 1.0, dpi.seeded(0)))
    assert torch.equal(dpi.release(x, 1.0, 1.0, dpi.seeded(5)), dpi.release(x, 1.0, 1.0, dpi.seeded(5)))


# -- nodes, rendering, labels ---------------------------------------------------------------------------------------
class _Fixed(Detector):
    """One face in the middle of any image (or none): the iteration's plumbing without a real detector."""
    name = "fixed"

    def __init__(self, found=True):
        self.found = found

    def detect(self, image):
        if not self.found:
            return []
        h, w = image.shape[:2]
        lm = torch.tensor([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.72], [0.62, 0.72]]) * torch.tensor([w, h])
        return [Face(torch.tensor([0.2 * w, 0.2 * h, 0.8 * w, 0.85 * h]), lm, 0.99)]


class _PixelEmbedder(FaceModel):
    """A stand-in recognizer: a fixed random projection of the image, unit norm, 512-d."""

    def __init__(self, found=True):
        super().__init__(_Fixed(found), None, name="stub", metric="cosine", threshold=0.5, differentiable=False)
        self.proj = torch.randn(3 * 8 * 8, 512, generator=torch.Generator().manual_seed(9))

    def embed(self, images, landmarks):
        small = torch.nn.functional.interpolate(images.float(), size=(8, 8), mode="area").flatten(1) - 0.5
        return torch.nn.functional.normalize(small @ self.proj, dim=1)


@pytest.fixture(scope="module")
def faceid(tmp_path_factory, tiny_sd):
    d = tmp_path_factory.mktemp("dp_faceid")
    shape = fx.tiny_shape(tiny_sd[0])
    files = {"faceid": fx.write_adapter(d / "ip-adapter-faceid_sd15.bin", "faceid", **shape),
             "faceid-plus": fx.write_adapter(d / "ip-adapter-faceid-plusv2_sd15.bin", "faceid-plus", **shape)}
    with torch.inference_mode():
        files["adapter"] = ipa.load_adapter(files["faceid"])
    return files


@pytest.fixture(scope="module")
def prompt(tiny_sd):
    clip = tiny_sd[1]
    with torch.inference_mode():
        return tuple(clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in ("a portrait photo", "blurry"))


def _original(seed=0):
    emb = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=1)
    return {"embedding": emb, "crops_224": torch.rand(1, 224, 224, 3), "landmarks": torch.rand(1, 5, 2),
            "batch_index": [0], "model": "arcface-r50", "warning": None}


def _release(rounds=1, noise_seed=123, sigma=1.0, original=None):
    from diffprivacy.nodes.dp_nodes import DiffPrivacyDPIdentity
    out, text, eps, s = DiffPrivacyDPIdentity().release(original or _original(), 1.0, "sigma", sigma, 10.0, 1e-5,
                                                        rounds, True, noise_seed)
    return out


def _render(tiny_sd, faceid, prompt, noised, mode="strict", image=None, mask=None, face_model=None, seed=4,
            model=None, text="a portrait photo", **conds):
    from diffprivacy.nodes.dp_nodes import DiffPrivacyDPRender
    with torch.inference_mode():
        images, label, receipt = DiffPrivacyDPRender().render(
            model or tiny_sd[0], tiny_sd[2], tiny_sd[1], text, "blurry", faceid["adapter"], noised, mode, seed, 2,
            3.0, "euler", "normal", 64, 64, 1.0, 0.9, image=image, face_model=face_model, mask=mask, resolution=64,
            **conds)["result"]
    if image is not None:  # in the photo: the photo at its own size; strict: width x height
        assert images.shape[1:3] == (image.shape[1:3] if mode == "in the photo" else (64, 64))
    assert json.loads(receipt)["outputs"] or mode == "strict" or json.loads(receipt).get("error")
    return images, json.loads(label)


def _photos():
    a = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[:, 16:48, 16:48] = 1.0 - b[:, 16:48, 16:48]  # the original's pixels changed (its face region, here)
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:56, 8:56] = 1.0
    return a, b, mask


def test_the_released_embedding_carries_no_crop_no_landmarks_and_its_dp_parameters():
    out = _release()
    assert out["crops_224"] is None and out["landmarks"] is None
    assert out["dp"]["report"]["sigma"] == 1.0 and out["dp"]["noise_seed"] == 123
    assert not torch.allclose(out["embedding"], _original()["embedding"], atol=0.1)


def test_strict_output_is_bit_identical_when_the_originals_pixels_change_and_in_the_photo_is_not(
        tiny_sd, faceid, prompt):
    a, b, mask = _photos()
    noised = _release()
    strict_a, label = _render(tiny_sd, faceid, prompt, noised, "strict", image=a, mask=mask)
    strict_b, _ = _render(tiny_sd, faceid, prompt, noised, "strict", image=b, mask=mask)
    assert strict_a.shape == (1, 64, 64, 3) and torch.equal(strict_a, strict_b)
    photo_a, _ = _render(tiny_sd, faceid, prompt, noised, "in the photo", image=a, mask=mask)
    photo_b, _ = _render(tiny_sd, faceid, prompt, noised, "in the photo", image=b, mask=mask)
    assert not torch.equal(photo_a, photo_b)
    other, _ = _render(tiny_sd, faceid, prompt, _release(noise_seed=124), "strict", image=a)
    assert not torch.equal(other, strict_a)  # the noised identity does reach the image


def _leaky_inputs(tiny_sd, faceid, original):
    """The channels through which the original can reach a 'strict' render besides the noised embedding: a MODEL
    carrying a stream of the original's identity (as Apply Identity Streams makes it), a MODEL with another node's
    attention patch, a MODEL with a LoRA, and a CONDITIONING carrying extra tokens made from the original."""
    import comfy.lora
    from diffprivacy.guidance import identity_streams as ids
    model = tiny_sd[0]
    with torch.inference_mode():
        on, off = ids.identity_tokens(faceid["adapter"], original["embedding"])
        streamed, _ = ids.apply_identity_streams(model, [ids.Stream("identity", faceid["adapter"], on, off)])
        patched = model.clone()
        patched.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1, 0)
        lora = model.clone()
        key = next(iter(comfy.lora.model_lora_keys_unet(model.model, {}).values()))
        lora.add_patches({key: ("diff", (torch.zeros_like(model.model.state_dict()[key]),))}, 1.0)
        positive = [[torch.cat([c, on.expand(c.shape[0], -1, -1)[..., :c.shape[-1]]], dim=1), dict(o)]
                    for c, o in tiny_sd[1].encode_from_tokens_scheduled(tiny_sd[1].tokenize("a portrait photo"))]
    return {"model": [streamed, patched, lora], "positive": positive}


def test_strict_refuses_a_model_or_conditioning_that_can_carry_the_original_naming_the_input(tiny_sd, faceid,
                                                                                             prompt):
    """The leaking channels are MODEL and CONDITIONING (strict never reads `image`): each is refused by name, and
    the same inputs in the photo mode run but are labelled NOT DP with the reason recorded."""
    leaky = _leaky_inputs(tiny_sd, faceid, _original())
    noised = _release(noise_seed=0)
    for model, what in zip(leaky["model"], ("identity stream", "attn2 replacement", "weight patches")):
        with pytest.raises(ValueError, match=f"the `model` input carries: .*{what}"):
            _render(tiny_sd, faceid, prompt, noised, "strict", model=model)
    with pytest.raises(ValueError, match="the `positive` CONDITIONING was not built here"):
        _render(tiny_sd, faceid, prompt, noised, "strict", positive=leaky["positive"], negative=prompt[1])
    with pytest.raises(ValueError, match="`prompt` names a textual-inversion embedding"):
        _render(tiny_sd, faceid, prompt, noised, "strict", text="a photo of embedding:someone")
    a, _, mask = _photos()
    _, label = _render(tiny_sd, faceid, prompt, noised, "in the photo", image=a, mask=mask, model=leaky["model"][0],
                       positive=leaky["positive"], negative=prompt[1])
    assert label["differentially_private"] is False and label["inputs"]["conditioning"] == "connected"
    assert any("identity stream" in r for r in label["not_private_because"])
    _, clean = _render(tiny_sd, faceid, prompt, noised, "strict")
    assert clean["differentially_private"] is True and clean["not_private_because"] == []
    assert clean["inputs"] == {"photo_read": False, "model": [], "clip": [], "conditioning": "built",
                               "prompt": "a portrait photo", "negative_prompt": "blurry"}


def test_the_label_is_computed_from_what_went_in_not_from_the_mode():
    report = dpi.account(1.0, 1.0, 1e-5)
    clean = {"photo_read": False, "model": [], "clip": [], "conditioning": "built"}
    assert dpi.release_label(report, "strict", clean)["differentially_private"] is True
    assert dpi.release_label(report, "strict")["differentially_private"] is False  # nothing recorded: no claim
    for leak in (dict(photo_read=True), dict(model=["Diff-Privacy identity stream(s)"]), dict(clip=["a LoRA"]),
                 dict(conditioning="connected")):
        label = dpi.release_label(report, "strict", dict(clean, **leak))
        assert label["differentially_private"] is False and "NOT differentially private" in label["statement"]
        assert label["not_private_because"], leak


def test_the_iterated_strict_form_re_embeds_each_round_and_still_ignores_the_original(tiny_sd, faceid, prompt):
    a, b, _ = _photos()
    noised = _release(rounds=3)
    out_a, label = _render(tiny_sd, faceid, prompt, noised, "strict", image=a, face_model=_PixelEmbedder())
    out_b, _ = _render(tiny_sd, faceid, prompt, noised, "strict", image=b, face_model=_PixelEmbedder())
    assert torch.equal(out_a, out_b)
    one, _ = _render(tiny_sd, faceid, prompt, _release(rounds=1), "strict")
    assert not torch.equal(one, out_a)  # rounds 2 and 3 did change the identity rendered
    assert len(label["rounds_cosine_to_round_1"]) == 3
    assert label["mechanism"]["rounds"] == 3 and label["epsilon"] == label["mechanism"]["epsilon_first_round"]
    assert label["mechanism"]["epsilon"] > label["epsilon"]  # the T released embeddings compose


def test_labels_say_strict_is_private_only_with_secret_noise_and_in_the_photo_never(tiny_sd, faceid, prompt):
    a, _, mask = _photos()
    _, secret = _render(tiny_sd, faceid, prompt, _release(noise_seed=0), "strict")
    _, fixed = _render(tiny_sd, faceid, prompt, _release(noise_seed=5), "strict")
    _, photo = _render(tiny_sd, faceid, prompt, _release(noise_seed=0), "in the photo", image=a, mask=mask)
    assert secret["differentially_private"] is True and secret["release"] == "strict"
    assert secret["epsilon"] == pytest.approx(dpi.epsilon_accountant(1.0, 2.0, 1e-5)) and secret["delta"] == 1e-5
    assert fixed["differentially_private"] is False and "NOT private" in fixed["statement"]
    assert photo["differentially_private"] is False and "NOT differentially private" in photo["statement"]


def test_saved_images_have_no_metadata_and_a_sidecar_with_the_label(tmp_path, monkeypatch):
    import folder_paths
    from PIL import Image
    from diffprivacy.nodes.dp_nodes import DiffPrivacySaveDPImage
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    clean = {"photo_read": False, "model": [], "clip": [], "conditioning": "built"}
    label = dpi.label_text(dpi.release_label(dpi.account(1.0, 1.0, 1e-5), "strict", clean))
    ui = DiffPrivacySaveDPImage().save(torch.rand(2, 64, 64, 3), label, "diffprivacy/dp")["ui"]
    assert len(ui["images"]) == 2
    for i, entry in enumerate(ui["images"]):
        png = tmp_path / entry["subfolder"] / entry["filename"]
        assert not Image.open(png).info  # no text chunks: no workflow, no seed
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["differentially_private"] is True and side["statement"] == json.loads(label)["statement"]
        assert side["image"] == png.name and side["index_in_batch"] == i
    with pytest.raises(ValueError, match="JSON label"):
        DiffPrivacySaveDPImage().save(torch.rand(1, 64, 64, 3), "not json", "diffprivacy/dp")


def test_faceid_plus_which_reads_the_original_crop_is_refused(tiny_sd, faceid, prompt):
    with torch.inference_mode():
        plus = ipa.load_adapter(faceid["faceid-plus"])
    from diffprivacy.nodes.dp_nodes import DiffPrivacyDPRender
    with pytest.raises(ValueError, match="FaceID Plus also reads the original face crop"):
        DiffPrivacyDPRender().render(tiny_sd[0], tiny_sd[2], tiny_sd[1], "a portrait", "blurry", plus, _release(),
                                     "strict", 0, 1, 1.0, "euler", "normal", 64, 64, 1.0, 1.0)


def test_every_dp_node_input_has_a_tooltip_and_every_node_a_description():
    from diffprivacy.nodes import dp_nodes
    for cls in dp_nodes.NODE_CLASS_MAPPINGS.values():
        assert cls.DESCRIPTION
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), f"{cls.__name__}.{name}"
        assert cls.RETURN_TYPES == () or len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_radius=0.0), "clip radius C must be"),
    (dict(clip_radius=-1.0), "clip radius C must be"),
    (dict(sigma=0.0), "noise sigma must be"),
    (dict(delta=0.0), "delta must lie strictly between 0 and 1"),
    (dict(delta=1.0), "delta must lie strictly between 0 and 1"),
    (dict(rounds=0), "rounds T must be"),
    (dict(noise_by="target epsilon", target_epsilon=1e-6), "unreachable"),
    (dict(noise_by="target epsilon", target_epsilon=0.0), "target epsilon must be"),
])
def test_bad_parameters_are_refused_with_a_message_naming_them(kwargs, message):
    from diffprivacy.nodes.dp_nodes import DiffPrivacyDPIdentity
    args = dict(face_embedding=_original(), clip_radius=1.0, noise_by="sigma", sigma=1.0, target_epsilon=10.0,
                delta=1e-5, rounds=1, renormalize=True, noise_seed=0)
    with pytest.raises(ValueError, match=message):
        DiffPrivacyDPIdentity().release(**dict(args, **kwargs))


def test_an_image_with_no_face_is_a_clear_error_before_and_during_the_rounds(tiny_sd, faceid, prompt):
    from diffprivacy.guidance.face.base import NoFaceError
    from diffprivacy.nodes.identity_nodes import DiffPrivacyFaceEmbedding
    with pytest.raises(NoFaceError, match="No face was detected in image 0"):
        DiffPrivacyFaceEmbedding().embed(torch.full((1, 64, 64, 3), 0.5), _PixelEmbedder(found=False), "largest", 0)
    with pytest.raises(ValueError, match="round 1 of 2: no face in the image rendered"):
        _render(tiny_sd, faceid, prompt, _release(rounds=2), "strict", face_model=_PixelEmbedder(found=False))
    with pytest.raises(ValueError, match="not a DP release"):
        _render(tiny_sd, faceid, prompt, _original(), "strict")


# -- live server -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(comfy_server, tiny_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_live")
    shape = fx.tiny_shape(tiny_sd[0])
    comfy_server.put_model("ipadapter", "ip-adapter-faceid_sd15.bin",
                           fx.write_adapter(d / "ip-adapter-faceid_sd15.bin", "faceid", **shape))
    comfy_server.put_model("insightface/models/buffalo_l", "w600k_r50.onnx",
                           fx.export_arcface_onnx(d / "buffalo_l" / "w600k_r50.onnx"))
    if not (comfy_server.base / "input" / "face.png").exists():
        pytest.skip("shared photos are not present (input/face.png)")
    return comfy_server


def _small(api):
    for node in nodes_of(api, "DiffPrivacyDPRender"):
        node["inputs"].update(steps=2, width=64, height=64)
    return api


def test_dp_identity_runs_live_saves_the_label_beside_the_image_and_survives_bad_input(served, workflow_api):
    bad = _small(workflow_api("dp-identity"))
    nodes_of(bad, "DiffPrivacyDPIdentity")[0]["inputs"]["clip_radius"] = 0.0
    entry = served.run(bad, timeout=300, expect_error=True)
    error = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert error["node_type"] == "DiffPrivacyDPIdentity" and "clip radius C" in error["exception_message"]
    assert served.alive()
    started = time.time()
    entry = served.run(_small(workflow_api("dp-identity")), timeout=600)
    saved = [img for o in entry["outputs"].values() for img in o.get("images", [])
             if img["filename"].startswith("dp-identity")]
    assert saved, entry["outputs"]
    png = served.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["release"] == "strict" and side["differentially_private"] is True
    assert side["epsilon"] == pytest.approx(dpi.epsilon_accountant(1.0, 2.0, 1e-5), rel=1e-6)
    from PIL import Image
    assert Image.open(io.BytesIO(served.view(saved[0]))).size == (64, 64)
    assert png.stat().st_mtime >= started - 1


# -- evaluation rows ---------------------------------------------------------------------------------------------------
def test_evaluation_rows_count_a_different_face_as_protected_and_carry_the_sidecar_label(tmp_path):
    from diffprivacy.evaluation import dp_image
    model = _PixelEmbedder()
    g = torch.Generator().manual_seed(2)

    def blocky():  # 8x8 random blocks: the stub's 8x8 pooling tells such images apart
        return torch.rand(8, 8, 3, generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
    originals = [blocky() for _ in range(4)]
    protected = [originals[0].clone(), originals[1].clone(), blocky(), blocky()]
    row = dp_image.dp_rows(model, originals, protected)
    assert row["pairs"] == 4 and row["fppsr"] == 0.5  # two unchanged (same person), two unrelated images
    assert row["ssim"] < 1.0 and row["iss"] < 1.0
    assert dp_image.match_strength([(1.0, 0.9), (3.0, 0.5), (5.0, 0.1)], 0.3) == pytest.approx(4.0)
    assert dp_image.match_strength([(1.0, 0.9), (3.0, 0.5)], 0.1) is None
    label = dpi.release_label(dpi.account(1.0, 1.0, 1e-5), "in the photo")
    (tmp_path / "a.json").write_text(json.dumps(dict(label, image="a.png")))
    found = dp_image.labels_of(tmp_path)
    assert found["differentially_private"] is False and "NOT differentially private" in found["labels"]["a.png"]


def test_embedding_rows_follow_the_expected_cosine_and_are_recognised_only_at_tiny_sigma():
    from diffprivacy.evaluation import dp_image
    x = torch.nn.functional.normalize(torch.randn(20, 512, generator=torch.Generator().manual_seed(4)), dim=1)
    model = _PixelEmbedder()  # cosine metric, threshold 0.5 (distance 1 - cos)
    small, large = dp_image.embedding_rows(model, x, [0.005, 1.0], repeats=5)
    assert small["fppsr_embedding"] == 0.0 and large["fppsr_embedding"] == 1.0
    assert large["cosine"] == pytest.approx(large["expected_cosine"], abs=0.02)
    assert small["epsilon"] > 100 * large["epsilon"]


def test_in_the_photo_a_group_photo_keeps_its_size_and_its_pixels_outside_the_face_mask(tiny_sd, faceid):
    from conftest import shared_path
    from face_fixtures import dlib_model, load_photo
    from diffprivacy.methods.pipeline import PipelineOptions, plan_photo
    from diffprivacy.nodes.dp_nodes import DiffPrivacyDPRender
    group = load_photo(shared_path("data", "photos", "group-6-faces.jpg"), max_side=4000)[None]
    with torch.inference_mode():
        out = DiffPrivacyDPRender().render(tiny_sd[0], tiny_sd[2], tiny_sd[1], "a portrait photo", "blurry",
                                           faceid["adapter"], _release(), "in the photo", 4, 2, 3.0, "euler", "normal",
                                           64, 64, 1.0, 0.9, image=group, face_model=dlib_model(), resolution=64)
    image, label, receipt = out["result"]
    plan = plan_photo(group[0], dlib_model(), PipelineOptions(faces="largest"), 64)
    outside = plan.mask() == 0
    assert image.shape == (1, 886, 1280, 3) and torch.equal(image[0][outside], group[0][outside])
    assert not torch.equal(image, group)
    assert [f["crop_size"] for f in json.loads(receipt)["outputs"][0]["faces"]] == [plan.crops[0].side]


# -- behind the method contract ---------------------------------------------------------------------------------------
def test_render_settings_are_validated_once_and_strict_takes_nothing_of_the_photo():
    import dataclasses

    from diffprivacy.methods import contract, dp_render
    args = (0, 2, 3.0, "euler", "normal")
    with pytest.raises(ValueError, match="render mode must be one of"):
        dp_render.RenderSettings("somewhere", *args)
    with pytest.raises(ValueError, match="width and height must be multiples of 8"):
        dp_render.RenderSettings("strict", *args, width=60)
    with pytest.raises(ValueError, match="denoise must be in"):
        dp_render.RenderSettings("in the photo", *args, denoise=1.5)
    with pytest.raises(ValueError, match="strict rendering reads nothing of the photo"):
        dp_render.RenderSettings("strict", *args, mask=torch.ones(1, 64, 64))
    strict = dp_render.RenderSettings("strict", *args)
    with pytest.raises(ValueError, match="only 'in the photo' rendering works on a photo's face crops"):
        dp_render.run([], contract.Models(), strict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        strict.mode = "in the photo"


def test_the_rounds_arrive_as_steps_and_the_label_carries_each_rounds_cosine(tiny_sd, faceid):
    from diffprivacy.guidance.progress import Step
    from diffprivacy.methods import contract, dp_render
    steps = []
    models = contract.Models(model=tiny_sd[0], clip=tiny_sd[1], vae=tiny_sd[2], face_model=_PixelEmbedder(),
                             adapter=faceid["adapter"], extra={"release": _release(rounds=3)})
    settings = dp_render.RenderSettings("strict", 4, 2, 3.0, "euler", "normal", "a portrait photo", "blurry", 64, 64)
    with torch.inference_mode():
        images, label = dp_render.render_release(models, settings, progress=steps.append)
    assert images.shape == (1, 64, 64, 3) and len(label["rounds_cosine_to_round_1"]) == 3
    assert steps and all(type(s) is Step and s.total == 3 for s in steps) and steps[-1].done == 3
    assert label["differentially_private"] is False  # the noise seed is fixed: reproducible, so not private
