"""FSAP (thesis ch. 5, Alg. 7) on the tiny model with the real FaceNet-CASIA: the stop at tau, the perceptual steps'
effect, the exact sign steps, Cancel keeping the best W, the node, bad input, the losses, and the thesis's
evaluation row with dlib. The tiny model has random weights: its renders are not faces and its numbers are not
results (a real SD 1.5 with IP-Adapter-FaceID is needed for those)."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

import ip_adapter_fixtures as fx
from conftest import shared_path
from diffprivacy.methods import fsap
from diffprivacy.guidance.face.base import NoFaceError

SIZE = 64            # the tiny model renders at pixel cost: a 64x64 portrait (MTCNN finds the 18x26 face)
LAMBDA_I = 4e-3      # larger than the default so that a few iterations move L_I measurably
STEPS = 4            # DDIM grid: 2 inversion steps to t = T/2, 2 render steps back


@pytest.fixture(scope="module")
def setup(tiny_checkpoint_path, tmp_path_factory):
    """A private tiny MODEL/VAE (thawed by the search), a FaceID adapter of its shape, a real face, FaceNet-CASIA."""
    import comfy.sd
    from face_fixtures import casia_face_model, small_face_image
    from diffprivacy.guidance import ip_adapter as ipa
    with torch.inference_mode():
        model, _, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=True,
                                                              output_clip=False)[:3]
        path = fx.write_adapter(tmp_path_factory.mktemp("fsap") / "ip-adapter-faceid_sd15.bin", "faceid",
                                **fx.tiny_shape(model))
        adapter = ipa.load_adapter(path)
    photo = small_face_image(shared_path("data", "photos", "biden.jpg"), SIZE)
    image = torch.from_numpy(np.array(photo)).float()[None] / 255.0
    w0 = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    cond = [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(4)), {}]]
    return {"model": model, "vae": vae, "adapter": adapter, "image": image, "w0": w0, "cond": cond,
            "face": casia_face_model()}


def _run(setup, **kw):
    from diffprivacy.inversion.ddim import ddim_invert
    options = dict(steps=STEPS, lambda_i=LAMBDA_I, k=1, n=6)
    render = kw.pop("render_final", True)
    progress = kw.pop("progress", None)
    options.update(kw)
    with torch.inference_mode():
        return fsap.run_fsap(setup["model"], setup["vae"], setup["cond"], setup["adapter"], setup["w0"],
                             setup["image"], setup["face"], fsap.FSAPSettings(**options), invert=ddim_invert,
                             trace=True, progress=progress, render_final=render)


@pytest.fixture(scope="module")
def start(setup):
    """L_I of the original's W (N = 0: one evaluation) on the stand-in x_hat0 and on the delivered render."""
    r = _run(setup, n=0)
    return r.history[0].l_i, r.l_i


@pytest.fixture(scope="module")
def runs(setup, start):
    """tau two identity steps' worth above the delivered image's L_I at W_0 (the stand-in is above it from the
    start: on the tiny model x_hat0 scores ~0.12 higher than the delivered render)."""
    tau = start[1] + 0.0008
    no_p = _run(setup, tau=tau, lambda_p=0.0, n=8)
    with_p = _run(setup, tau=tau, lambda_p=LAMBDA_I, n=8)
    return tau, no_p, with_p


def test_identity_loss_rises_past_tau_on_the_delivered_image_and_the_loop_stops_at_the_first_such_iteration(runs):
    tau, r, _ = runs
    delivered = [h.l_i_delivered for h in r.history]
    assert r.history[0].l_i > tau                        # the stand-in alone would have stopped at W_0
    assert r.reached and delivered[-1] > tau, delivered
    assert all(v is not None and v <= tau for v in delivered[:-1]), delivered  # the first delivered pass stops it
    assert 2 <= len(delivered) <= 8, delivered           # it took steps to get there, within N
    assert r.iterations == len(delivered) - 1
    assert r.l_i_on == "delivered image" and r.l_i == pytest.approx(delivered[-1], abs=2e-4)  # the final render's
    assert r.l_i_standin == r.history[-1].l_i and torch.equal(r.w, r.history[-1].w.to(r.w))
    assert delivered[-1] > delivered[0] + 0.0005          # L_I rose, the first record is W_0's
    assert float(torch.nn.functional.cosine_similarity(r.w, r.w0)) < 1 - 1e-4


def test_a_stand_in_above_tau_is_not_success_when_the_delivered_image_is_below_it(setup, start):
    """tau just above the stand-in's start: x_hat0 passes within a few iterations, the delivered render never does.
    The result says NOT reached, names the iterations where only the stand-in passed, and reports the delivered
    L_I, recomputed here from the returned image."""
    tau = start[0] + 0.004
    r = _run(setup, tau=tau, lambda_p=0.0)
    assert max(h.l_i for h in r.history) > tau            # the stand-in did pass
    assert not r.reached and r.standin_only and all(d <= tau for _, _, d in r.standin_only)
    x = setup["image"].movedim(-1, 1)
    lm = setup["face"].detect(setup["image"][0])[0].landmarks.float()[None]
    saved = ((r.image * 255).round() / 255).movedim(-1, 1)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(setup["face"].embed(saved, lm), setup["face"].embed(x, lm))
    assert r.l_i == pytest.approx(1 - float(cos), abs=1e-4) and r.l_i <= tau
    text = fsap.report_text(r, fsap.FSAPSettings(tau=tau, lambda_i=LAMBDA_I, k=1, n=6, steps=STEPS))
    assert "on the delivered image" in text and "NOT reached" in text and "stand-in passed tau" in text
    assert "reached)" not in text.replace("NOT reached)", "")


def test_with_perceptual_steps_the_final_image_is_closer_to_the_original_at_the_same_tau(runs, setup):
    tau, no_p, with_p = runs
    assert no_p.reached and with_p.reached
    mse = [float(((r.image - setup["image"]) ** 2).mean()) for r in (no_p, with_p)]
    assert mse[1] < mse[0], mse
    assert with_p.history[-1].parts["mse"] < no_p.history[-1].parts["mse"]


def test_sign_steps_move_w_by_exactly_lambda_per_coordinate_before_renormalisation(runs):
    _, no_p, with_p = runs
    for kind, delta in no_p.trace + with_p.trace:
        steps = delta.abs() / LAMBDA_I  # lambda_I and lambda_P are both LAMBDA_I in these runs
        moved = steps[steps > 0]
        if kind == "identity":  # sign of one gradient: every coordinate with a gradient moves exactly lambda_I
            torch.testing.assert_close(moved, torch.ones_like(moved), atol=1e-9, rtol=0)
            assert moved.numel() > 500
        else:  # the sum of the signs of MSE's and SSIM's gradients: 0, 1 or 2 lambda_P per coordinate
            torch.testing.assert_close(moved, moved.round(), atol=1e-9, rtol=0)
            assert set(moved.round().tolist()) <= {1.0, 2.0}
    assert {k for k, _ in with_p.trace} == {"identity", "perceptual"}
    for r in (no_p, with_p):  # and W is back on the sphere of W_0 after every step
        assert float(r.w.norm()) == pytest.approx(float(r.w0.norm()), abs=1e-6)


def test_cancel_during_the_search_keeps_the_best_w_so_far(setup):
    import comfy.model_management as mm

    def cancel_in_iteration_2(step):
        if step.detail["iteration"] == 2:
            mm.interrupt_current_processing(True)
    r = _run(setup, tau=2.0, n=5, k=0, progress=cancel_in_iteration_2, render_final=False)
    assert r.interrupted and not r.reached
    assert len(r.history) == 2 and r.iterations == 2  # W_1, W_2 evaluated; W_3 (stepped when Cancel came) not
    best = max(r.history, key=lambda h: h.l_i)
    assert r.l_i == best.l_i and torch.equal(r.w, best.w.to(r.w))
    assert best.iteration == 2 and not torch.equal(r.w, r.w0.to(r.w))  # the identity step raised L_I: W_2 kept
    assert "Cancel" in r.notes[0]
    assert not mm.processing_interrupted()


# -- the node and bad input --------------------------------------------------------------------------------------------
def _node_args(setup, **kw):
    args = dict(model=setup["model"], vae=setup["vae"], positive=setup["cond"], identity_adapter=setup["adapter"],
                face_embedding={"embedding": setup["w0"]}, image=setup["image"], face_model=setup["face"],
                tau=0.8, lambda_i=fsap.LAMBDA_I, lambda_p=fsap.LAMBDA_P, k=6, max_iterations=0, timestep=0.5,
                steps=STEPS, latent_step=0.0, identity_weight=1.0, perceptual_mode="batched", resolution=0)
    args.update(kw)
    return args


def test_node_renders_reports_lpips_absence_and_returns_the_curve_and_the_found_embedding(setup, tmp_path,
                                                                                         monkeypatch):
    from diffprivacy.nodes.fsap_nodes import DiffPrivacyFSAP
    monkeypatch.setenv("DIFFPRIVACY_MODELS_DIR", str(tmp_path))
    import folder_paths
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    with torch.inference_mode():
        out = DiffPrivacyFSAP().run(**_node_args(setup))
    image, curve, found, report, l_i, receipt = out["result"]
    assert image.shape == setup["image"].shape and curve.shape[-1] == 3  # the photo at its size (a face crop inside)
    receipt = json.loads(receipt)  # measured under dlib, not the CASIA FaceNet FSAP steered against
    assert receipt["recognizer"] == "dlib-resnet128" and receipt["guided_by"] == setup["face"].name
    assert receipt["outputs"][0]["faces"][0]["crop_size"] > 0 and any("receipt" in t for t in out["ui"]["text"])
    assert torch.equal(found["embedding"], setup["w0"])  # N = 0: W_0 is rendered as it is
    assert "LPIPS absent" in report and "alex.pth" in report
    assert l_i == pytest.approx(float(report.split("L_I = ")[1].split()[0]), abs=1e-4)


def test_every_input_has_a_tooltip_and_the_defaults_are_the_thesis_values_rescaled():
    from diffprivacy.nodes.fsap_nodes import NODE_CLASS_MAPPINGS
    for cls in NODE_CLASS_MAPPINGS.values():
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for section in ("required", "optional"):
            for name, spec in cls.INPUT_TYPES().get(section, {}).items():
                assert spec[1].get("tooltip"), (cls.__name__, name)
    req = NODE_CLASS_MAPPINGS["DiffPrivacyFSAP"].INPUT_TYPES()["required"]
    assert req["lambda_i"][1]["default"] == pytest.approx(0.02 / 512 ** 0.5, rel=1e-3)
    assert req["lambda_p"][1]["default"] == pytest.approx(0.008 / 512 ** 0.5, rel=1e-3)
    assert (req["tau"][1]["default"], req["k"][1]["default"], req["max_iterations"][1]["default"]) == (0.8, 6, 100)
    assert "0.0442" in req["lambda_i"][1]["tooltip"] and "0.0442" in req["lambda_p"][1]["tooltip"]


@pytest.mark.parametrize("bad, message", [
    ({"tau": 0.0}, "tau must lie in"), ({"tau": 2.5}, "tau must lie in"), ({"tau": -0.1}, "tau must lie in"),
    ({"k": -1}, "k must be"), ({"max_iterations": -1}, "n must be"),
])
def test_out_of_range_settings_are_refused_with_the_setting_named(setup, bad, message):
    from diffprivacy.nodes.fsap_nodes import DiffPrivacyFSAP
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        DiffPrivacyFSAP().run(**_node_args(setup, **bad))


def test_no_face_and_a_non_differentiable_recognizer_are_refused(setup):
    from face_fixtures import dlib_model
    from diffprivacy.nodes.fsap_nodes import DiffPrivacyFSAP
    with torch.inference_mode(), pytest.raises(NoFaceError, match="No face"):
        DiffPrivacyFSAP().run(**_node_args(setup, image=torch.full((1, SIZE, SIZE, 3), 0.5)))
    with torch.inference_mode(), pytest.raises(ValueError, match="not differentiable.*dlib"):
        DiffPrivacyFSAP().run(**_node_args(setup, face_model=dlib_model()))


def test_the_fsap_method_runs_through_the_contract_on_a_batch_where_one_photo_has_no_face(setup):
    """fsap.METHOD behind contract.protect: the portrait is delivered (its report measured on the delivered render),
    the grey photo is reported as not protected; progress is one Step per iteration carrying the history."""
    from diffprivacy.methods import contract
    photos = torch.cat([setup["image"], torch.full_like(setup["image"], 0.5)])
    models = contract.Models(model=setup["model"], vae=setup["vae"], face_model=setup["face"],
                             adapter=setup["adapter"], extra={"conditioning": setup["cond"], "face_embedding": {
                                 "embedding": torch.cat([setup["w0"], -setup["w0"]])}})
    steps = []
    with torch.inference_mode():
        delivery = contract.protect(photos, fsap.METHOD, models, fsap.FSAPSettings(
            steps=STEPS, lambda_i=LAMBDA_I, k=1, n=2, tau=2.0), resolution=0, progress=steps.append, receipt=False)
    (done,) = delivery.delivered
    (face,) = done.result.faces
    result = face.parts["result"]
    assert done.index == 0 and done.images.shape == setup["image"].shape
    assert [i for i, _ in delivery.failures] == [1] and "No face" in delivery.failures[0][1]
    assert torch.equal(result.w0, setup["w0"])                                # photo 0 starts from its own row
    assert face.report["l_i_on"] == "delivered image" and face.report["l_i"] == result.l_i
    assert not face.report["reached"] and json.loads(json.dumps(face.report))["iterations"] == 2
    assert [s.detail["iteration"] for s in steps] == [1, 2]                   # one Step per iteration (k = 1)
    assert [len(s.detail["history"]) for s in steps] == [1, 2] and steps[-1].done == steps[-1].total == 2
    with pytest.raises(ValueError, match="not differentiable"):               # checked before any photo is planned
        from face_fixtures import dlib_model
        contract.protect(photos, fsap.METHOD, contract.Models(face_model=dlib_model()), fsap.FSAPSettings())


# -- the losses --------------------------------------------------------------------------------------------------------
def test_differentiable_ssim_and_lpips_equal_the_evaluation_metrics():
    from diffprivacy.evaluation.lpips import LPIPS
    from diffprivacy.evaluation.pixel_metrics import ssim as eval_ssim
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 48, 40, generator=g).unbind(0)
    ours = fsap.ssim(a[None], b[None])
    assert float(ours) == pytest.approx(float(eval_ssim(a.permute(1, 2, 0), b.permute(1, 2, 0))), abs=1e-5)
    convs = ((0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3))
    back = {}
    for i, cin, cout, k in convs:
        back[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        back[f"features.{i}.bias"] = torch.zeros(cout)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, (_, _, c, _) in enumerate(convs)}
    model = LPIPS(back, heads)
    x, y = torch.rand(2, 64, 72, 3, generator=g).unbind(0)
    xt = x.permute(2, 0, 1)[None].requires_grad_(True)
    d = fsap.lpips_distance(model, xt, y.permute(2, 0, 1)[None])
    assert float(d.detach()) == pytest.approx(model.distance(x, y), rel=1e-5)
    d.sum().backward()
    assert xt.grad.abs().sum() > 0


def test_sign_step_and_renormalisation_are_the_thesis_updates():
    w = torch.tensor([[0.6, -0.8, 0.0]], dtype=torch.float64)
    g1, g2, g3 = torch.tensor([[2.0, -1e-9, 0.0]]), torch.tensor([[1.0, 3.0, -1.0]]), torch.tensor([[5.0, 1.0, 1.0]])
    assert torch.equal(fsap.sign_step(w, [g1], 0.1, +1.0), w + 0.1 * torch.tensor([[1.0, -1.0, 0.0]]).double())
    three = fsap.sign_step(w, [g1, g2, g3], 0.01, -1.0)
    assert torch.allclose(three, w - 0.01 * torch.tensor([[3.0, 1.0, 0.0]]).double())
    assert float(fsap.renormalised(w * 3, 1.0).norm()) == pytest.approx(1.0)


def test_better_prefers_reaching_tau_then_lower_perceptual_loss_else_higher_identity_loss():
    rec = lambda li, lp, delivered=None: fsap.Record(0, li, lp, {}, l_i_delivered=delivered)  # noqa: E731
    assert fsap.better(rec(0.9, 5.0), rec(0.7, 0.1), 0.8)
    assert not fsap.better(rec(0.9, 0.1, delivered=0.5), rec(0.85, 5.0, delivered=0.81), 0.8)  # delivered decides
    assert fsap.better(rec(0.9, 0.1, delivered=0.5), rec(0.7, 0.1), 0.8)  # neither passed: higher L_I
    assert fsap.better(rec(0.85, 0.1), rec(0.95, 0.2), 0.8)
    assert fsap.better(rec(0.5, 9.0), rec(0.4, 0.1), 0.8)
    assert not fsap.better(rec(0.4, 0.1), rec(0.5, 9.0), 0.8)


def test_loss_curve_draws_both_losses_and_tau():
    hist = [fsap.Record(i + 1, 0.5 + 0.05 * i, 1.0 - 0.1 * i, {}) for i in range(6)]
    img = fsap.curve_image(hist, 0.7)[0]
    red = ((img[..., 0] > 0.7) & (img[..., 1] < 0.3)).sum()
    blue = ((img[..., 2] > 0.7) & (img[..., 0] < 0.3)).sum()
    assert img.shape == (256, 512, 3) and red > 100 and blue > 100


# -- the gradient decoder (issue 17) ----------------------------------------------------------------------------------
def test_tiny_gradient_decoder_carries_the_gradient_while_the_output_is_the_full_vae_decode(setup, vae_approx,
                                                                                            monkeypatch, caplog):
    from tiny_models import GradientDecoderSpy
    from diffprivacy.guidance import gradient_path as gp
    spy = GradientDecoderSpy(monkeypatch, setup["vae"], vae_approx)
    with caplog.at_level(logging.INFO, logger="diffprivacy"):
        r = _run(setup, n=1, k=0, tau=2.0, gradient=gp.GradientOptions(decoder="tiny", face_window=True))
    assert any(spy.tiny_grads) and not spy.full_calls  # the gradient went through the tiny decoder, never the full VAE
    assert not torch.equal(r.w, r.w0.to(r.w))  # and moved W
    assert "gradient decoder: tiny (taesd_decoder.safetensors)" in caplog.text
    assert caplog.text.count("face window is not used") == 1
    spy.assert_output_is_the_full_vae_decode(r.image, setup["model"])  # the final DDIM render, full VAE


def test_tiny_gradient_decoder_without_its_file_fails_naming_the_folder(setup, vae_approx):
    from diffprivacy.guidance.gradient_path import GradientOptions
    from diffprivacy.nodes.fsap_nodes import DiffPrivacyFSAP
    options = GradientOptions(decoder="tiny")
    with torch.inference_mode(), pytest.raises(ValueError, match=rf"taesd_decoder.*{re.escape(str(vae_approx))}"):
        DiffPrivacyFSAP().run(**_node_args(setup, gradient_options=options))


# -- the thesis's evaluation row ---------------------------------------------------------------------------------------
def test_comparison_row_counts_spr_sdr_and_region_distances_with_dlib():
    from face_fixtures import casia_face_model, small_face_image
    from diffprivacy.evaluation import fsap_eval
    from diffprivacy.guidance.face.dlib_face import load_dlib_face_model
    dlib = load_dlib_face_model(512)  # HOG on a 512 copy of the 256 photos: faster than the default 1600
    load = lambda n: torch.from_numpy(np.array(small_face_image(shared_path("data", "photos", n), 256))  # noqa: E731
                                      ).float() / 255.0
    biden, obama = load("biden.jpg"), load("obama.jpg")
    originals = torch.stack([biden, biden, biden])
    protected = torch.stack([biden, obama, torch.full_like(biden, 0.5)])  # same person, other person, no face
    row = fsap_eval.fsap_comparison(originals, protected, dlib, {"dlib": dlib, "facenet-casia": casia_face_model()})
    per = row["images"]
    assert [p["spr_dlib"] for p in per] == [False, True, False]       # no face: not protected (the thesis's rule)
    assert [p["spr_facenet-casia"] for p in per] == [False, True, False]
    assert row["spr"]["dlib"] == pytest.approx(1 / 3) and row["sdr"] == pytest.approx(2 / 3)
    assert all(per[0][k] == 0.0 for k in fsap_eval.REGIONS) and per[0]["mse"] == 0.0
    assert all(per[1][k] > 0.0 for k in fsap_eval.REGIONS) and "chin" not in per[2]
    table = fsap_eval.comparison_table({"test": row})
    assert "| test | 0.333 | 0.333 | 0.667 |" in table and "FSAP (thesis) | 0.967 | 0.96 | 1 |" in table


# -- the shipped workflow, live ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(comfy_server, tmp_path_factory, tiny_checkpoint_path):
    import comfy.sd
    from diffprivacy.guidance import ip_adapter as ipa
    d = tmp_path_factory.mktemp("fsap_live")
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False,
                                                      output_clip=False)[0]
    comfy_server.put_model("ipadapter", "ip-adapter-faceid_sd15.bin",
                           fx.write_adapter(d / "ip-adapter-faceid_sd15.bin", "faceid", **fx.tiny_shape(model)))
    comfy_server.put_model("loras", ipa.FACEID_LORAS["faceid"], fx.write_unet_lora(d / "lora.safetensors", model))
    comfy_server.put_model("insightface/models/buffalo_l", "w600k_r50.onnx",
                           fx.export_arcface_onnx(d / "buffalo_l" / "w600k_r50.onnx"))
    return comfy_server


def _small_fsap(api):
    from workflow_helpers import only
    load = only(api, "LoadImage")
    api["9001"] = {"class_type": "ImageScale", "inputs": {"image": [load, 0], "upscale_method": "area",
                                                          "width": SIZE, "height": SIZE, "crop": "center"}}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if nid != "9001" and value == [load, 0]:
                node["inputs"][name] = ["9001", 0]
    api[only(api, "DiffPrivacyFSAP")]["inputs"].update(max_iterations=1, k=1, steps=STEPS, resolution=SIZE)
    return api


def test_fsap_workflow_runs_live_and_a_dlib_recognizer_is_refused_while_the_server_keeps_serving(served,
                                                                                                  workflow_api):
    from workflow_helpers import only
    bad = _small_fsap(workflow_api("fsap"))
    bad[only(bad, "DiffPrivacyFSAP")]["inputs"]["face_model"] = [only(bad, "DiffPrivacyDlibFaceModel"), 0]
    entry = served.run(bad, timeout=300, expect_error=True)
    error = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert error["node_type"] == "DiffPrivacyFSAP" and "not differentiable" in error["exception_message"]
    assert served.alive()
    api = _small_fsap(workflow_api("fsap"))
    entry = served.run(api, timeout=600)
    assert served.output_images(entry)
    (table,) = entry["outputs"][only(api, "DiffPrivacyFSAPEvaluation")]["text"]
    assert "| SPR dlib |" in table and "FSAP (thesis)" in table
    report, receipt = entry["outputs"][only(api, "DiffPrivacyFSAP")]["text"]  # shown on the node: both
    assert "LPIPS" in report and "L_I =" in report and receipt.startswith("receipt")


def test_the_node_on_a_group_photo_keeps_its_size_and_every_pixel_outside_the_face_mask(setup):
    from face_fixtures import load_photo
    from diffprivacy.methods.pipeline import PipelineOptions, plan_photo
    from diffprivacy.nodes.fsap_nodes import DiffPrivacyFSAP
    group = load_photo(shared_path("data", "photos", "group-6-faces.jpg"), max_side=4000)[None]
    with torch.inference_mode():
        out = DiffPrivacyFSAP().run(**_node_args(setup, image=group, resolution=128))
    image, receipt = out["result"][0], json.loads(out["result"][5])
    plan = plan_photo(group[0], setup["face"], PipelineOptions(faces="largest"), 128)
    outside = plan.mask() == 0
    assert image.shape == (1, 886, 1280, 3) and torch.equal(image[0][outside], group[0][outside])
    assert [f["crop_size"] for f in receipt["outputs"][0]["faces"]] == [plan.crops[0].side]
    with torch.inference_mode(), pytest.raises(ValueError, match="one face.*at a time|1 face"):
        DiffPrivacyFSAP().run(**_node_args(setup, image=group, resolution=128, pipeline=PipelineOptions()))


def test_fsap_in_a_face_crop_works_on_the_face_the_crop_was_cut_around_not_a_larger_neighbour():
    from diffprivacy.guidance.face.base import Face
    from diffprivacy.methods.contract import CropJob
    from diffprivacy.methods.pipeline import Crop

    class TwoFaces:
        def detect(self, image):  # a large face on the left, a small one on the right (largest first)
            return [Face(torch.tensor([0.0, 12.0, 32.0, 52.0]), torch.full((5, 2), 16.0), 0.9),
                    Face(torch.tensor([44.8, 25.6, 57.6, 38.4]), torch.full((5, 2), 51.0), 0.9)]
    image = torch.rand(1, 64, 64, 3)
    job = CropJob(image, Crop(0, 0, 64, (40, 20, 64, 44), 0, 1, (44.8, 25.6, 57.6, 38.4)))
    landmarks, box = fsap.original_face(TwoFaces(), image, job.face_mask())
    assert box[0] > 40 and landmarks[0, 0] == 51.0                        # the crop's own face
    assert fsap.original_face(TwoFaces(), image)[1][0] == 0.0               # without a mask: the largest
