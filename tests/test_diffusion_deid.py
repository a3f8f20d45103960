"""Diffusion De-ID (thesis ch. 6) on the tiny model with the real FaceNet-CASIA: the IIS loss, the pairing, the pool's
fixed prior and real-fake check, the identity check on the delivered image, and the method through the dataset
command. The tiny model has random weights: its renders are not faces
and its numbers are not results (a real SD 1.5 with IP-Adapter-FaceID and CLIP-vision is needed for those)."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil

import numpy as np
import pytest
import torch

import ip_adapter_fixtures as fx
from conftest import shared_path
from diffprivacy.methods import diffusion_deid as deid

SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def setup(tiny_checkpoint_path, tiny_clip_vision_path, tmp_path_factory):
    import comfy.clip_vision
    import comfy.sd
    from face_fixtures import casia_face_model, small_face_image
    from diffprivacy.guidance import ip_adapter as ipa
    folder = tmp_path_factory.mktemp("deid")
    with torch.inference_mode():
        model, _, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=True,
                                                              output_clip=False)[:3]
        adapter_file = fx.write_adapter(folder / "ip-adapter-faceid_sd15.bin", "faceid", **fx.tiny_shape(model))
        adapter = ipa.load_adapter(adapter_file)
        cv = comfy.clip_vision.load(str(tiny_clip_vision_path))
    photo = small_face_image(shared_path("data", "photos", "biden.jpg"), SIZE)
    image = torch.from_numpy(np.array(photo)).float()[None] / 255.0
    cond = [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(4)), {}]]
    face = casia_face_model()
    appearance = deid.Appearance(cv)
    reals = torch.nn.functional.normalize(torch.randn(6, 512, generator=torch.Generator().manual_seed(2)), dim=1)
    with torch.inference_mode():
        pool = deid.build_pool(model, vae, cond, cond, adapter, face, appearance, reals, count=3, seed=5,
                               resolution=SIZE, steps=2, cfg=1.0)
    return {"model": model, "vae": vae, "adapter": adapter, "adapter_file": adapter_file, "image": image,
            "cond": cond, "face": face, "appearance": appearance, "pool": pool}


def _anonymize(setup, gradient=None, **kw):
    from diffprivacy.inversion.ddim import ddim_invert
    options = dict(steps=STEPS, render_steps=2, iterations=6, lambda_att=0.0, lr=1.0, checkpoint=False)
    options.update(kw)
    with torch.inference_mode():
        return deid.anonymize(setup["model"], setup["vae"], setup["cond"], setup["adapter"], setup["face"],
                              setup["appearance"], setup["pool"], setup["image"],
                              deid.DeIDSettings(**options, gradient=gradient), invert=ddim_invert)


def _toward_real(setup):
    """The pool with every fake's recognizer embedding replaced by the real face's: IRS then maximises |cos| to the
    real face, the opposite of IIS."""
    from face_fixtures import mtcnn
    pool = setup["pool"]
    lm = mtcnn().detect(setup["image"][0])[0].landmarks.float()[None]
    with torch.no_grad():
        ref = setup["face"].embed(setup["image"].movedim(-1, 1), lm)
    return deid.Pool(pool.identity, pool.appearance, pool.latents, ref.expand(len(pool), -1).clone(),
                     torch.ones(len(pool), dtype=torch.bool), pool.meta)


def _with_identity(pool, index, embedding):
    identity = pool.identity.clone()
    identity[index] = embedding[0]
    return deid.Pool(identity, pool.appearance, pool.latents, pool.recognizer, pool.has_face, pool.meta)


def test_the_iis_loss_drives_the_identity_cosine_to_the_real_face_toward_zero(setup):
    """A random model's renders start near |cos| = 0.01 to the real face: first the opposite objective (IRS with the
    real face as its target) raises |cos|, showing the embedding moves the recognizer; then IIS from there drives it
    back toward 0."""
    toward_real = _toward_real(setup)
    up = _anonymize({**setup, "pool": toward_real}, objective="irs")
    cos_up = [abs(h.cos) for h in up.history]
    assert up.history[0].l_id == pytest.approx(1 - cos_up[0])   # IRS: L_id is 1 - |cos|
    assert max(cos_up) > 4 * cos_up[0], cos_up                   # the opposite objective raised |cos|
    assert float(up.embedding.norm()) == pytest.approx(float(setup["pool"].identity[up.pair].norm()), rel=1e-5)
    r = _anonymize({**setup, "pool": _with_identity(setup["pool"], up.pair, up.embedding)})
    cos = [abs(h.cos) for h in r.history]
    assert r.history[0].l_id == pytest.approx(cos[0])             # IIS: L_id is |cos|
    assert cos[0] == pytest.approx(max(cos_up), rel=1e-3)         # it starts where IRS ended
    assert min(cos) < 0.25 * cos[0] and abs(r.best.cos) == min(cos), cos  # and is driven toward 0
    info = r.info()
    assert info["cos"] == pytest.approx(r.best.cos, abs=1e-6) and info["cos_start"] == pytest.approx(r.history[0].cos,
                                                                                                   abs=1e-6)
    assert r.image is not None and r.image.shape == setup["image"].shape and bool(torch.isfinite(r.image).all())


def test_x_t_from_the_paired_fake_renders_from_the_fakes_latent_not_the_real_images(setup):
    real = _anonymize(setup, iterations=0)
    fake = _anonymize(setup, iterations=0, x_t="fake")
    assert real.pair == fake.pair
    assert float((real.image - fake.image).abs().mean()) > 1e-3
    # a pool of that one fake: whatever the real photo, it pairs with fake 0, so the comparison always runs
    pool, p = setup["pool"], fake.pair
    single = deid.Pool(pool.identity[p:p + 1], pool.appearance[p:p + 1], pool.latents[p:p + 1],
                       pool.recognizer[p:p + 1], pool.has_face[p:p + 1], pool.meta)
    other = setup["image"].clone()
    other[:, :, : SIZE // 4] = 0.5  # the real photo changed away from the face: the fake's x_T does not see it
    fake_single = _anonymize({**setup, "pool": single}, iterations=0, x_t="fake")
    fake_other = _anonymize({**setup, "pool": single, "image": other}, iterations=0, x_t="fake")
    assert fake_single.pair == fake_other.pair == 0
    torch.testing.assert_close(fake_single.image, fake.image)
    torch.testing.assert_close(fake_other.image, fake.image)
    real_other = _anonymize({**setup, "pool": single, "image": other}, iterations=0)
    assert float((real_other.image - real.image).abs().mean()) > 1e-4  # x_t="real" does see the change


def test_pairing_returns_the_nearest_fake_of_a_brute_force_distance_matrix():
    g = torch.Generator().manual_seed(0)
    real, fakes = torch.randn(9, 16, generator=g), torch.randn(14, 16, generator=g)
    got = deid.nearest_fakes(real, fakes)
    brute = [[math.dist(r.tolist(), f.tolist()) for f in fakes] for r in real]
    assert got.tolist() == [int(np.argmin(row)) for row in brute]
    allowed = torch.zeros(14, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    got = deid.nearest_fakes(real, fakes, allowed)
    assert got.tolist() == [min((3, 7, 11), key=lambda j: row[j]) for row in brute]
    with pytest.raises(ValueError, match="no fake in the pool can be paired"):
        deid.nearest_fakes(real, fakes, torch.zeros(14, dtype=torch.bool))


def test_pair_image_pairs_a_real_image_with_the_fake_nearest_in_clip_vision_space(setup):
    pool = setup["pool"]
    with torch.no_grad():
        app = setup["appearance"](setup["image"].movedim(-1, 1))[0]
    idx, dist = deid.pair_image(pool, setup["appearance"], setup["image"], "iis")
    brute = [float((app[0] - a).norm()) for a in pool.appearance]
    assert idx == int(np.argmin(brute)) and dist == pytest.approx(min(brute), rel=1e-5)
    # the differentiable forward is ComfyUI's own encoder (on an 8-bit 224² image its preprocessing rounds nothing)
    img = (torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    with torch.no_grad():
        ours = setup["appearance"](img.movedim(-1, 1))
        theirs = setup["appearance"].cv.encode_image(img)
    torch.testing.assert_close(ours[0], theirs["image_embeds"].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1], theirs["last_hidden_state"][:, 1:].float(), atol=1e-4, rtol=1e-4)


def test_fake_identities_come_from_a_prior_that_does_not_depend_on_the_real_set():
    """The audit's case: with 2 real faces, a Gaussian fitted to them put fakes at cos ~0.41 to a real person. The
    prior is fixed (uniform on the unit sphere): two different real sets give the same fakes, which sit at the
    chance level of 512-d cosines to every real face, far beyond ArcFace's match threshold."""
    g = torch.Generator().manual_seed(1)
    reals_a = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=1)
    reals_b = torch.nn.functional.normalize(torch.randn(2, 512, generator=g) + 3 * reals_a, dim=1)
    fakes_a, check_a = deid.fake_identities(200, seed=3, real_embeddings=reals_a)
    fakes_b, _ = deid.fake_identities(200, seed=3, real_embeddings=reals_b)
    assert torch.equal(fakes_a, fakes_b) and check_a["redrawn"] == 0
    assert torch.allclose(fakes_a.norm(dim=1), torch.ones(200), atol=1e-5)
    cos = fakes_a @ reals_a.T
    assert float(cos.abs().max()) < 0.25 and float(cos.mean().abs()) < 0.01  # chance level, not around the reals
    assert float(cos.std()) == pytest.approx(1 / math.sqrt(512), rel=0.15)
    assert check_a["min_real_fake_distance"] == pytest.approx(float((1 - cos).min()), abs=1e-6)
    assert torch.equal(deid.draw_identities(10, seed=4), deid.draw_identities(10, seed=4))
    assert deid.pool_size(61) == 92 and deid.pool_size(2, 1.01) == 3
    with pytest.raises(ValueError, match="must exceed 1"):
        deid.pool_size(10, 1.0)


def test_every_fake_is_beyond_the_match_threshold_of_every_real_face_or_redrawn():
    g = torch.Generator().manual_seed(5)
    reals = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=1)
    # threshold 1.0 (cosine distance): any fake with cos > 0 to a real face "matches": about 3 in 4 draws are redrawn
    fakes, check = deid.fake_identities(40, seed=6, real_embeddings=reals, threshold=1.0)
    dist = deid.identity_distances(fakes, reals, "cosine")
    assert bool((dist >= 1.0).all()) and check["redrawn"] > 40
    assert check["min_real_fake_distance"] == pytest.approx(float(dist.min())) and check["min_real_fake_distance"] >= 1
    l2, check_l2 = deid.fake_identities(5, seed=6, real_embeddings=reals, metric="l2", threshold=1.42)
    assert bool((deid.identity_distances(l2, reals, "l2") >= 1.42).all()) and check_l2["identity_metric"] == "l2"
    with pytest.raises(ValueError, match="leaves no room on the sphere"):  # v and -v: every point is within 1.05
        deid.fake_identities(1, seed=0, real_embeddings=torch.cat([reals[:1], -reals[:1]]), threshold=1.05)


def test_the_pool_states_its_smallest_real_fake_distance_and_every_report_repeats_it(setup):
    pool = setup["pool"]
    assert pool.meta["prior"] == "uniform on the unit sphere" and "mean" not in pool.meta
    reals = torch.nn.functional.normalize(torch.randn(6, 512, generator=torch.Generator().manual_seed(2)), dim=1)
    smallest = float(deid.identity_distances(pool.identity, reals, "cosine").min())
    assert pool.meta["min_real_fake_distance"] == pytest.approx(smallest, abs=1e-6)
    assert pool.meta["min_real_fake_distance"] >= pool.meta["identity_threshold"] == 0.68
    info = _anonymize(setup, iterations=0).info()
    assert info["min_real_fake_distance"] == pytest.approx(smallest, abs=1e-6)
    text = deid.report_text(info, "iis")
    assert f"smallest real-fake identity distance {smallest:.4f}" in text


def test_the_reported_identity_check_is_measured_on_the_delivered_image(setup):
    """The optimisation's cos comes from its short stand-in render; the report's verdict from the delivered image
    (8-bit rounded) under the recognizer: recomputed here, and the verdict flips for the original itself."""
    from face_fixtures import mtcnn
    r = _anonymize(setup, iterations=1)
    face = setup["face"]
    x_r = setup["image"].movedim(-1, 1)
    lm = mtcnn().detect(setup["image"][0])[0].landmarks.float()[None]
    saved = (r.image * 255).round() / 255
    found = face.detect(saved[0])
    lms = found[0].landmarks.float()[None] if found else lm
    with torch.no_grad():
        cos = float(torch.nn.functional.cosine_similarity(face.embed(saved.movedim(-1, 1), lms),
                                                          face.embed(x_r, lm)))
    d = r.info()["delivered"]
    assert d["cos"] == pytest.approx(cos, abs=1e-4) and d["face_found"] == bool(found)
    assert d["cos"] != pytest.approx(r.best.cos, abs=1e-3)  # not the stand-in's number
    same = deid.delivered_identity(face, setup["image"], x_r, lm)  # an output that is the input
    assert same["recognised"] is True and same["cos"] > 0.99
    assert "STILL RECOGNISED" in deid.report_text({**r.info(), "delivered": same}, "iis")


def test_the_pool_file_round_trips_and_other_files_are_refused(setup, tmp_path):
    pool = setup["pool"]
    pool.save(tmp_path / "pool.safetensors")
    back = deid.Pool.load(tmp_path / "pool.safetensors")
    assert torch.equal(back.identity, pool.identity) and torch.equal(back.latents, pool.latents)
    assert back.meta["count"] == 3 and back.meta["resolution"] == SIZE and len(back) == 3
    import safetensors.torch
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Diffusion De-ID pool"):
        deid.Pool.load(tmp_path / "other.safetensors")


def test_bad_settings_are_refused_with_the_name_of_the_setting():
    for kw, word in [({"objective": "swap"}, "objective"), ({"x_t": "noise"}, "x_t"), ({"lr": float("nan")}, "lr"),
                     ({"iterations": -1}, "iterations"), ({"render_steps": 9, "steps": 4}, "render_steps")]:
        with pytest.raises(ValueError, match=word):
            deid.DeIDSettings(**kw)
    s = deid.DeIDSettings.from_strings({"objective": "irs", "iterations": "3", "lr": "0.5", "checkpoint": "false"})
    assert (s.objective, s.iterations, s.lr, s.checkpoint) == ("irs", 3, 0.5, False)


def test_the_dataset_command_runs_diffusion_de_id_over_a_folder(setup, tmp_path, tiny_checkpoint_path,
                                                                tiny_clip_vision_path):
    import anonymize_dataset as cli
    from diffprivacy.methods import dataset as dr
    from face_fixtures import casia_safetensors
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    faces = sorted(shared_path("data", "faces-13id").glob("*.jpg"))[:3]
    for i, f in enumerate(faces):
        shutil.copy(f, (src / "sub" if i == 2 else src) / f.name)
    models = tmp_path / "models"
    (models / "facenet").mkdir(parents=True)
    (models / "facenet" / "facenet-casia-webface.safetensors").symlink_to(casia_safetensors())
    settings = {"checkpoint": str(tiny_checkpoint_path), "clip_vision": str(tiny_clip_vision_path),
                "adapter": str(setup["adapter_file"]), "models": str(models), "identity_model": "mtcnn/facenet-casia",
                "resolution": "64", "steps": "2", "render_steps": "1", "iterations": "1", "pool_steps": "1",
                "cfg": "1.0", "prompt": "a photo of a face"}
    summary = cli.run("diffusion-de-id", src, tmp_path / "out", tmp_path / "keys", settings, use_ray=False,
                     progress=False, log=lambda m: None)
    rows = list(dr.Manifest(tmp_path / "out").read().values())
    assert summary["status"] == {"ok": 3}, rows
    assert all(r["faces_protected"] == len(r["pair"]) >= 1 for r in rows)          # one pair per protected face
    assert all(0 <= p < r["pool_size"] and r["pool_size"] > 3 for r in rows for p in r["pair"])
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == \
        sorted(str((src / "x").parent.joinpath(f.name).relative_to(src).with_suffix(".png").as_posix())
               if i != 2 else f"sub/{f.stem}.png" for i, f in enumerate(faces))
    from PIL import Image
    for f in faces:  # the output has the original's size
        out = next((tmp_path / "out").rglob(f.stem + ".png"))
        assert Image.open(out).size == Image.open(f).size
    pools = list((tmp_path / "keys").glob("*.pool.safetensors"))
    assert len(pools) == 1 and not list((tmp_path / "out").rglob("*.safetensors"))  # the pool stays private
    again = cli.run("diffusion-de-id", src, tmp_path / "out", tmp_path / "keys", settings, use_ray=False,
                   progress=False, log=lambda m: None)
    assert again["ran"] == 0


def test_the_node_says_how_to_get_a_pool_when_none_is_given():
    from diffprivacy.nodes.deid_nodes import DiffPrivacyDiffusionDeID
    with pytest.raises(ValueError, match="build the pool with scripts/anonymize_dataset.py"):
        DiffPrivacyDiffusionDeID().deidentify(None, None, None, None, None, None, None, " ", "a photo", "iis", "real",
                                              30, 1.0, 50)
    with pytest.raises(ValueError, match="objective must be one of"):
        DiffPrivacyDiffusionDeID().deidentify(None, None, None, None, None, None, None, "x", "a photo", "other",
                                              "real", 30, 1.0, 50)


# -- the gradient decoder (issue 17) ----------------------------------------------------------------------------------
def test_tiny_gradient_decoder_carries_the_gradient_while_the_output_is_the_full_vae_decode(setup, vae_approx,
                                                                                            monkeypatch, caplog):
    from tiny_models import GradientDecoderSpy
    from diffprivacy.guidance import gradient_path as gp
    spy = GradientDecoderSpy(monkeypatch, setup["vae"], vae_approx)
    with caplog.at_level(logging.INFO, logger="diffprivacy"):
        r = _anonymize(setup, gp.GradientOptions(decoder="tiny", face_window=True), iterations=1)
    assert spy.tiny_grads == [True, True] and not spy.full_calls  # both renders of x_A went through the tiny decoder
    assert r.history[1].loss != r.history[0].loss  # its gradient moved the embedding
    assert "gradient decoder: tiny (taesd_decoder.safetensors)" in caplog.text
    assert caplog.text.count("face window is not used") == 1
    spy.assert_output_is_the_full_vae_decode(r.image, setup["model"])  # the final DDIM render, full VAE


def test_the_node_with_the_tiny_gradient_decoder_and_no_file_fails_naming_the_folder(setup, tiny_sd, vae_approx,
                                                                                     tmp_path, monkeypatch):
    import folder_paths
    from diffprivacy.guidance.gradient_path import GradientOptions
    from diffprivacy.nodes.deid_nodes import DiffPrivacyDiffusionDeID
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    setup["pool"].save(tmp_path / "pool.safetensors")
    with torch.inference_mode(), pytest.raises(ValueError, match=rf"taesd_decoder.*{re.escape(str(vae_approx))}"):
        DiffPrivacyDiffusionDeID().deidentify(setup["model"], setup["vae"], tiny_sd[1], setup["appearance"].cv,
                                              setup["adapter"], setup["face"], setup["image"], "pool.safetensors",
                                              "a photo", "iis", "real", 1, 0.0, STEPS, resolution=SIZE,
                                              gradient_options=GradientOptions(decoder="tiny"))


def test_the_node_de_identifies_chosen_faces_of_a_group_photo_at_its_size_with_a_receipt(setup, tiny_sd, tmp_path,
                                                                                          monkeypatch):
    import folder_paths
    from face_fixtures import load_photo
    from diffprivacy.methods.pipeline import PipelineOptions, plan_photo
    from diffprivacy.nodes.deid_nodes import DiffPrivacyDiffusionDeID
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    setup["pool"].save(tmp_path / "pool.safetensors")
    group = load_photo(shared_path("data", "photos", "group-6-faces.jpg"), max_side=4000)[None]
    pipeline = PipelineOptions(faces="indices", face_indices="0, 1")
    with torch.inference_mode():
        out = DiffPrivacyDiffusionDeID().deidentify(setup["model"], setup["vae"], tiny_sd[1], setup["appearance"].cv,
                                                    setup["adapter"], setup["face"], group, "pool.safetensors",
                                                    "a photo", "iis", "real", 1, 0.0, STEPS, resolution=128,
                                                    pipeline=pipeline)
    image, report, receipt = out["result"]
    plan = plan_photo(group[0], setup["face"], pipeline, 128)
    outside = plan.mask() == 0
    assert image.shape == (1, 886, 1280, 3) and torch.equal(image[0][outside], group[0][outside])
    assert not torch.equal(image, group) and report.count("paired with fake") == 2
    faces = json.loads(receipt)["outputs"][0]["faces"]
    assert [f["crop_size"] for f in faces] == [c.side for c in plan.crops]


# -- behind the method contract ---------------------------------------------------------------------------------------
def test_the_method_runs_behind_the_contract_with_one_step_per_iteration_and_the_curve_in_its_detail(setup):
    """Through contract.protect, what the node calls: progress arrives as Steps only, one per iteration (0..N of N),
    each with the curve so far; the face's report is the optimisation's info with the face's index."""
    from diffprivacy.guidance.progress import Step
    from diffprivacy.methods import contract
    steps = []
    settings = deid.DeIDSettings(steps=STEPS, render_steps=2, iterations=2, lambda_att=0.0, lr=1.0, checkpoint=False)
    models = contract.Models(model=setup["model"], vae=setup["vae"], clip_vision=setup["appearance"],
                             face_model=setup["face"], adapter=setup["adapter"],
                             extra={"pool": setup["pool"], "conditioning": setup["cond"]})
    with torch.inference_mode():
        delivery = contract.protect(setup["image"], deid.METHOD, models, settings, resolution=SIZE,
                                    progress=steps.append, receipt=False)
    assert all(type(s) is Step for s in steps) and [(s.done, s.total) for s in steps] == [(0, 2), (1, 2), (2, 2)]
    assert [[r.iteration for r in s.detail["history"]] for s in steps] == [[0], [0, 1], [0, 1, 2]]
    (face,) = delivery.faces
    assert face.report["face"] == 0 and face.report["delivered"]["recognizer"] == setup["face"].name
    assert 0 <= face.report["pair"] < len(setup["pool"]) and json.dumps(face.report)   # JSON-ready
    assert delivery.images.shape == setup["image"].shape
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.iterations = 5   # validated once, when built


def test_in_a_face_crop_the_method_replaces_the_face_the_crop_was_cut_around_not_the_largest():
    from diffprivacy.guidance.face.base import Face

    class Two:
        def detect(self, image):
            return [Face(torch.tensor([0.0, 0.0, 40.0, 40.0]), torch.zeros(5, 2), 0.9),
                    Face(torch.tensor([44.0, 44.0, 64.0, 64.0]), torch.zeros(5, 2), 0.9)]
    image = torch.zeros(64, 64, 3)
    mask = torch.zeros(64, 64)
    mask[40:64, 40:64] = 1.0
    assert deid._chosen_face(Two(), image, None).box[0] == 0.0       # no crop: the largest
    assert deid._chosen_face(Two(), image, mask).box[0] == 44.0      # the crop's own face
    assert deid._chosen_face(Two(), image, torch.zeros(64, 64)) is None


def test_with_a_face_embedding_the_node_refuses_two_chosen_faces_before_any_work(setup, tiny_sd, tmp_path,
                                                                                monkeypatch):
    import folder_paths
    from face_fixtures import load_photo
    from diffprivacy.methods.pipeline import PipelineOptions
    from diffprivacy.nodes.deid_nodes import DiffPrivacyDiffusionDeID
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    setup["pool"].save(tmp_path / "pool.safetensors")
    group = load_photo(shared_path("data", "photos", "group-6-faces.jpg"), max_side=4000)[None]
    with torch.inference_mode(), pytest.raises(ValueError, match=r"Diffusion De-ID protects 1 face\(s\) at a time "
                                                                 r"and 2 are chosen"):
        DiffPrivacyDiffusionDeID().deidentify(setup["model"], setup["vae"], tiny_sd[1], setup["appearance"].cv,
                                              setup["adapter"], setup["face"], group, "pool.safetensors", "a photo",
                                              "iis", "real", 1, 0.0, STEPS, resolution=128,
                                              face_embedding={"embedding": torch.zeros(1, 512)},
                                              pipeline=PipelineOptions(faces="indices", face_indices="0, 1"))
