"""DDIM grid, inversion and recovery against an exact (Gaussian-data) denoiser."""
import pytest
import torch

import comfy.model_sampling
from diffprivacy.guidance.ddim import ddim_sigmas, ddim_timesteps
from diffprivacy.inversion.ddim import ddim_invert, ddim_recover, key_i_from_vp, key_i_to_vp, sample_ddim
from toy_models import GaussianDenoiser, toy_latent


@pytest.fixture(scope="module")
def ms():
    return comfy.model_sampling.ModelSamplingDiscrete()  # SD 1.x schedule: linear betas 0.00085..0.012


def test_grid_matches_reference_and_comfy_ddim_uniform(ms):
    assert ddim_timesteps(50)[:3] == [1, 21, 41] and ddim_timesteps(50)[-1] == 981
    import comfy.samplers as samplers  # the host's own scheduler (its full import chain is installed)
    assert torch.allclose(ddim_sigmas(ms, 50), samplers.calculate_sigmas(ms, "ddim_uniform", 50))
    assert len(samplers.calculate_sigmas(ms, "ddim_uniform", 30)) == 32  # ComfyUI's scheduler: 31 steps for 30
    assert len(ddim_timesteps(30)) == 30 and len(ddim_sigmas(ms, 30)) == 31
    assert ddim_timesteps(1000)[-1] == 999


@pytest.mark.parametrize("steps,strength,t_first,n", [(50, 0.6, 581, 30), (100, 0.8, 791, 80), (100, 0.29, 281, 29)])
def test_img2img_noises_to_the_first_denoising_step(ms, steps, strength, t_first, n):
    sig = ddim_sigmas(ms, steps, strength)
    assert len(sig) == n + 1 and float(sig[-1]) == 0.0
    assert float(sig[0]) == pytest.approx(float(ms.sigmas[t_first]))
    assert torch.all(sig[:-1] > sig[1:])


def test_bad_step_settings_are_rejected(ms):
    with pytest.raises(ValueError, match="strength"):
        ddim_sigmas(ms, 50, 0.0)
    with pytest.raises(ValueError, match="no denoising step"):
        ddim_sigmas(ms, 10, 0.05)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(0)


def _exact_inversion(x0, mean, std, sigma):
    # probability-flow ODE of Gaussian data: (x - mean) / sqrt(std^2 + sigma^2) is constant
    return mean + (x0 - mean) * ((std ** 2 + sigma ** 2) ** 0.5 / std)


def test_inversion_then_recovery_reproduces_the_latent_and_converges(ms):
    mean, std = toy_latent(1) * 0.5, 0.8
    x0 = mean + std * toy_latent(2)
    errors, inv_errors = [], []
    for steps in (10, 50, 250):
        sig = ddim_sigmas(ms, steps)
        model = GaussianDenoiser(mean, std)
        x_t = ddim_invert(model, x0.clone(), sig)
        back = ddim_recover(model, x_t, sig)
        errors.append(float((back - x0).abs().max()))
        inv_errors.append(float((x_t - _exact_inversion(x0, mean, std, float(sig[0]))).abs().max()
                                / (x_t.abs().max())))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 * float(x0.abs().max())
    assert inv_errors[0] > inv_errors[2] and inv_errors[2] < 0.02


def test_inversion_evaluates_the_model_at_each_target_level(ms):
    sig = ddim_sigmas(ms, 20)
    model = GaussianDenoiser(torch.zeros(1, 4, 8, 8), 1.0)
    steps = []
    ddim_invert(model, toy_latent(3), sig, callback=lambda d: steps.append(d["i"]))
    assert model.calls == pytest.approx(sig.flip(0)[1:].tolist(), rel=1e-6)  # never at sigma 0
    assert steps == list(range(20))
    assert sample_ddim is ddim_recover


def test_key_i_vp_conversion_round_trips():
    x = toy_latent(4) * 10
    assert torch.allclose(key_i_from_vp(key_i_to_vp(x, 14.6), 14.6), x, atol=1e-5)
    assert float(key_i_to_vp(x, 14.6).std()) < float(x.std()) / 14
