"""DIFP's adapter training (Eq. 9 then Eq. 11) on the tiny model: the loss falls, only the adapters change, the
files are IP-Adapter files the identity-streams loader reads, and an interrupted run resumes."""
from __future__ import annotations

import pytest
import torch

from diffprivacy.guidance import ip_adapter as ipa
from diffprivacy.methods import difp_training as dt


def _data():
    g = torch.Generator().manual_seed(0)
    return dt.DIFPDataset(torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 16, generator=g),
                          torch.randn(3, 32, generator=g), torch.zeros(1, 77, 64))


def _both(state):
    return {**dt.adapter_state_dict(state.identity),
            **{"s." + k: v for k, v in dt.adapter_state_dict(state.style).items()}}


def _loud_off_streams(model, state):
    """Both streams on ``model`` with their "off" tokens, made loud (their terms dominate rounding) and with "off"
    tokens that are not zero (a fresh adapter's are: no bias yet). Call with gradients enabled and no_grad."""
    from diffprivacy.guidance.identity_streams import Stream, apply_identity_streams
    for adapter in (state.identity, state.style):
        for layer in adapter.ip_adapter:
            layer.to_v_ip.weight.mul_(100.0)
        adapter.image_proj.norm.bias.add_(torch.linspace(-1.0, 1.0, adapter.image_proj.norm.bias.numel()))
    assert float(state.identity.off_tokens().abs().max()) > 0.5
    off_i, off_s = state.identity.off_tokens(), state.style.off_tokens()
    return apply_identity_streams(model, [Stream("identity", state.identity, off_i, off_i),
                                          Stream("style", state.style, off_s, off_s)])


def _fixed_loss(model, state, data):
    """The loss on fixed draws (stage-2 flags, both conditions on and off mixed)."""
    from diffprivacy.guidance.autograd import gradients_enabled
    opts = dt.DIFPTrainingOptions(steps=10, stage1_fraction=0.0, batch_size=12, seed=99)
    with gradients_enabled(), torch.no_grad():
        patched, ss = _loud_off_streams(model, state)
        idx, t, noise, keep = dt._draw(5, opts, 3, 1000, data.latents.shape[1:])
        return float(dt.epsilon_loss(patched, ss, state, data, idx, t, noise, keep))


def test_training_lowers_the_loss_reports_each_step_changes_only_the_adapters_and_writes_loadable_files(
        tiny_checkpoint_path, tmp_path):
    import comfy.sd
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False, output_clip=False)[0]
    unet_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    data = _data()
    opts = dt.DIFPTrainingOptions(steps=60, stage1_fraction=0.5, batch_size=4, learning_rate=2e-2, seed=1)
    start = dt.train_difp_adapters(model, data, dt.DIFPTrainingOptions(steps=1, learning_rate=1e-12, batch_size=1))
    start_sd = _both(start)
    before = _fixed_loss(model, start, data)
    steps = []
    state = dt.train_difp_adapters(model, data, opts, progress=steps.append)
    after = _fixed_loss(model, state, data)
    assert after < 0.995 * before, (before, after)  # fixed draws: deterministic; the random tiny UNet limits the gain
    # one Step per optimisation step, in the pack's one progress shape, carrying that step's loss
    assert [(s.done, s.total) for s in steps] == [(i, 60) for i in range(1, 61)]
    assert [s.detail["loss"] for s in steps] == state.losses and steps[-1].text.startswith("step 60/60, loss ")
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, unet_before[k]), f"the UNet changed: {k}"
    end_sd = _both(state)
    assert any(not torch.allclose(end_sd[k], start_sd[k]) for k in end_sd if "proj" in k)
    assert any(not torch.allclose(end_sd[k], start_sd[k]) for k in end_sd if "to_v_ip" in k)
    kinds = {}
    for adapter, name in ((state.identity, "id.safetensors"), (state.style, "st.safetensors")):
        loaded = ipa.load_adapter(dt.save_adapter(adapter, tmp_path / name))
        kinds[name] = loaded.spec.kind
        torch.testing.assert_close(loaded.ip_adapter[0].to_k_ip.weight, adapter.ip_adapter[0].to_k_ip.weight)
    assert kinds == {"id.safetensors": "faceid", "st.safetensors": "ip-adapter"}


def test_every_step_on_one_fixed_batch_lowers_its_loss(tiny_checkpoint_path, monkeypatch):
    """Gradient descent on the documented loss: the same stage-2 batch (conditions on and off mixed) every step, a
    small learning rate, and each of 10 Adam steps lowers that batch's loss (a wrong sign, a detached projection or
    the wrong loss would not), by more than 1 % in all on the random tiny UNet."""
    import comfy.sd
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False, output_clip=False)[0]
    real = dt._draw
    one = dt.DIFPTrainingOptions(steps=10, stage1_fraction=0.0, batch_size=12, seed=99)
    monkeypatch.setattr(dt, "_draw", lambda step, options, n, t, shape: real(5, one, n, t, shape))
    state = dt.train_difp_adapters(model, _data(), dt.DIFPTrainingOptions(steps=10, batch_size=12, learning_rate=3e-3,
                                                                          weight_decay=0.0, seed=1))
    losses = state.losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.99 * losses[0], losses


def test_stage_2_rows_with_a_dropped_condition_get_the_off_tokens_and_stage_1_drops_none(tiny_checkpoint_path):
    """Eq. 11's condition dropout: a row whose identity (style) flag is 0 is predicted exactly as if its identity
    (style) input were the zero condition, i.e. with the adapter's "off" tokens, and not as if it had none; rows
    with the flag on use their own input. Stage 1 (Eq. 9) keeps every condition."""
    import comfy.sd
    from diffprivacy.guidance.autograd import gradients_enabled
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False, output_clip=False)[0]
    data = _data()
    state = dt.train_difp_adapters(model, data, dt.DIFPTrainingOptions(steps=1, learning_rate=1e-12, batch_size=1))
    opts = dt.DIFPTrainingOptions(steps=100, stage1_fraction=0.5, batch_size=64, drop_probability=0.4, seed=3)
    for step in (0, 49):
        assert bool((dt._draw(step, opts, 3, 1000, (4, 8, 8))[3] == 1).all())  # stage 1: nothing dropped
    keep = dt._draw(50, opts, 3, 1000, (4, 8, 8))[3]
    assert 0.2 < float((keep == 0).float().mean()) < 0.6  # stage 2: about drop_probability of the flags are off
    idx = torch.tensor([0, 1, 2, 0])
    t = torch.tensor([500, 500, 500, 500])
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    flags = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    with gradients_enabled(), torch.no_grad():
        patched, ss = _loud_off_streams(model, state)
        eps = dt.epsilon_prediction(patched, ss, state, data, idx, t, noise, flags)
        zeroed = dt.DIFPDataset(data.latents, data.identity.clone(), data.style.clone(), data.text)
        zeroed.identity[1] = 0.0  # rows 1 and 3 (items 1 and 0): the zero condition, fed as "on"
        zeroed.style[2] = 0.0
        zeroed.identity[0] = zeroed.style[0] = 0.0
        as_zero = dt.epsilon_prediction(patched, ss, state, zeroed, idx, t, noise, torch.ones(4, 2))
        all_on = dt.epsilon_prediction(patched, ss, state, data, idx, t, noise, torch.ones(4, 2))
    for row in (1, 2, 3):  # dropped: exactly the zero condition's prediction
        torch.testing.assert_close(eps[row], as_zero[row], rtol=1e-5, atol=1e-5)
        assert float((eps[row] - all_on[row]).abs().max()) > 1e-2  # and not the row's own condition
    torch.testing.assert_close(eps[0], all_on[0], rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_resumes_where_it_stopped(tiny_checkpoint_path, tmp_path):
    import comfy.sd
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False, output_clip=False)[0]
    data = _data()
    opts = dt.DIFPTrainingOptions(steps=6, batch_size=2, learning_rate=1e-3, seed=2)
    full = dt.train_difp_adapters(model, data, opts)

    class Stop(KeyboardInterrupt):
        pass

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 4:
            raise Stop()
    saved = {}
    with pytest.raises(Stop):
        dt.train_difp_adapters(model, data, opts, check_interrupt=interrupt,
                               on_checkpoint=lambda s: saved.setdefault("path",
                                                                         dt.save_training_state(s, tmp_path / "t.pt")))
    partial = dt.load_training_state(saved["path"])
    assert partial.steps_done == 3
    resumed = dt.train_difp_adapters(model, data, opts, partial)
    assert resumed.steps_done == 6
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)
    torch.testing.assert_close(dt.adapter_state_dict(resumed.identity)["image_proj.proj.0.weight"],
                               dt.adapter_state_dict(full.identity)["image_proj.proj.0.weight"], rtol=1e-4, atol=1e-6)


def test_the_cli_trains_from_a_folder_of_faces_and_resumes(tiny_checkpoint_path, tiny_clip_vision_path, tmp_path,
                                                           monkeypatch, capsys):
    """scripts/train_difp_adapters.py (run in-process: the tiny model's type is registered by the test pack) on two
    real photos (MTCNN + a tiny ArcFace ONNX), 2 steps, then resumed to 3."""
    import runpy

    import ip_adapter_fixtures as fx
    from conftest import REPO, shared_path
    from face_fixtures import small_face_image
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("obama.jpg", "biden.jpg"):  # shrunk: MTCNN on the full photos would dominate the test's time
        small_face_image(shared_path("data", "photos", name), 160).save(faces / f"{name[:-4]}.png")
    onnx = fx.export_arcface_onnx(tmp_path / "buffalo_l" / "w600k_r50.onnx")
    out = tmp_path / "out"
    script = str(REPO / "scripts" / "train_difp_adapters.py")
    base = [script, "--checkpoint", str(tiny_checkpoint_path), "--clip-vision", str(tiny_clip_vision_path),
            "--faces", str(faces), "--out", str(out), "--recognizer-file", str(onnx), "--batch-size", "2",
            "--resolution", "128", "--checkpoint-every", "1"]

    def run(steps):
        monkeypatch.setattr("sys.argv", base + ["--steps", str(steps)])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(script, run_name="__main__")
        assert done.value.code == 0
        return capsys.readouterr().out

    assert "2 steps on 2 face(s)" in run(2)
    resumed = run(3)
    assert "step 3/3" in resumed and "step 1/" not in resumed  # resumed, not restarted
    assert ipa.load_adapter(out / "difp-identity.safetensors").spec.kind == "faceid"
    assert ipa.load_adapter(out / "difp-style.safetensors").spec.kind == "ip-adapter"


def test_the_training_node_hands_its_progress_bar_the_trainings_steps(monkeypatch):
    """The node passes a StepProgress as ``progress``: the Steps training sends move its bar (glue, no training)."""
    from diffprivacy.guidance.progress import Step
    from diffprivacy.nodes import difp_nodes
    bars = []

    class Bar:
        def __init__(self, total, node_id=None):
            self.total, self.seen = total, []
            bars.append(self)

        def __call__(self, step):
            self.seen.append(step)

    def fake_train(*args, progress=None, **kw):
        progress(Step(1, 7, "step 1/7, loss 0.5000", {"loss": 0.5}))
        return dt.DIFPTrainingResult("a-identity.safetensors", "a-style.safetensors", dt.DIFPTrainingState(None, None),
                                     2)

    monkeypatch.setattr(difp_nodes, "StepProgress", Bar)
    monkeypatch.setattr(dt, "train_from_folder", fake_train)
    out = difp_nodes.DiffPrivacyTrainDIFPAdapters().train(None, None, None, None, None, "faces", "a", 7, 0.5, 0.4, 1,
                                                          1e-4, 1e-3, True, 0, unique_id="5")
    assert out["result"] == ("a-identity.safetensors", "a-style.safetensors")
    assert [b.total for b in bars] == [7] and [s.done for s in bars[0].seen] == [1]
