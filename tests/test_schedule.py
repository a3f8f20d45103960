"""The embedding schedule (paper Eq. 16) as ComfyUI timestep ranges, checked inside ComfyUI's own sampler."""
import pytest
import torch

from diffprivacy.guidance.schedule import (NUM_STAGES, scheduled_conditioning, stage_of, stage_timestep_ranges,
                                           uses_uncond)
from diffprivacy.inversion.key_e import KeyE


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.4, 0.45, 0.6, 0.999, 1.0])
def test_ranges_cover_every_timestep_once_with_the_paper_rule(tau):
    owner = {}
    for stage, lo, hi in stage_timestep_ranges(tau):
        for t in range(lo, hi + 1):
            assert t not in owner, f"timestep {t} in two ranges"
            owner[t] = stage
    assert sorted(owner) == list(range(1000))
    for t, stage in owner.items():
        expected = None if t <= tau * 1000 else t // 100
        assert stage == expected, (t, stage, expected)


def test_bad_tau_and_bad_stage_lists_are_refused():
    with pytest.raises(ValueError, match="tau"):
        stage_timestep_ranges(1.5)
    c = [torch.zeros(1, 77, 8), {}]
    with pytest.raises(ValueError, match="10 stage"):
        scheduled_conditioning([c] * 9, c, 0.4)
    with pytest.raises(ValueError, match="ten stages"):
        KeyE.from_conditioning([[torch.zeros(3, 77, 8), {}]])


def test_batch_of_ten_splits_into_stages_with_pooled_outputs():
    t = torch.arange(NUM_STAGES, dtype=torch.float32).view(NUM_STAGES, 1, 1).expand(NUM_STAGES, 77, 8)
    pooled = torch.arange(NUM_STAGES, dtype=torch.float32).view(NUM_STAGES, 1).expand(NUM_STAGES, 8)
    stages = KeyE.from_conditioning([[t, {"pooled_output": pooled}]]).stage_entries()
    assert [float(s[0][0, 0, 0]) for s in stages] == list(range(NUM_STAGES))
    assert [float(s[1]["pooled_output"][0, 0]) for s in stages] == list(range(NUM_STAGES))


def _marked(value: float, width: int):
    return [torch.full((1, 77, width), value), {}]


@pytest.mark.parametrize("tau,scheduler,steps,denoise", [
    (0.4, "ddim_uniform", 50, 1.0),    # the paper's anonymization settings
    (0.6, "ddim_uniform", 100, 0.8),   # identity hiding: noising to 0.8 T
    (0.4, "karras", 37, 1.0),          # sigmas between integer timesteps
])
def test_each_sampling_step_gets_the_stage_the_equation_says(tiny_sd, tau, scheduler, steps, denoise):
    import comfy.sample
    import comfy.samplers

    model, clip, _ = tiny_sd
    width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
    stages = [_marked(float(i + 1), width) for i in range(NUM_STAGES)]
    uncond = _marked(-1.0, width)
    positive = scheduled_conditioning(stages, uncond, tau)

    seen = []
    patched = model.clone()
    model_sampling = patched.get_model_object("model_sampling")

    def record(apply_model, args):
        t = model_sampling.timestep(args["input"].new_tensor(float(args["timestep"][0])))
        ctx = args["c"]["c_crossattn"]
        seen.append((int(t), float(ctx[0, 0, 0]), float(ctx.std())))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(record)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = comfy.sample.sample(patched, noise, steps, 1.0, "ddim" if scheduler == "ddim_uniform" else "euler",
                                  scheduler, positive, [uncond], latent, denoise=denoise, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()
    assert len(seen) == steps  # one model call per step (cfg 1.0: no separate uncond pass)
    used = set()
    for t, marker, spread in seen:
        expected = -1.0 if uses_uncond(t, tau) else float(stage_of(t) + 1)
        assert marker == expected and spread == 0.0, f"t={t}: got marker {marker}, expected {expected}"
        used.add(marker)
    assert -1.0 in used and len(used) >= 3  # the run crossed UC and several stages
