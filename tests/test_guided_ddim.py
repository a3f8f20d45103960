"""Identity-guided DDIM with an exact denoiser, a fixed decoder and a fixed differentiable recognizer."""
import pytest
import torch
import torch.nn.functional as F

import comfy.model_sampling
from diffprivacy.guidance.energy import anonymize_energy, hide_energy
from diffprivacy.guidance.face.base import NoFaceError
from diffprivacy.guidance.guided_ddim import (GuidanceScale, IdentityGuidance, sample_guided_ddim,
                                              stage_guidance_scale)
from diffprivacy.guidance.ddim import ddim_sigmas, ddim_step, vp_scale
from toy_models import GaussianDenoiser, ToyDecoder, ToyFaceModel, toy_latent

MS = comfy.model_sampling.ModelSamplingDiscrete()
DEC, FACE = ToyDecoder(), ToyFaceModel()
ORIGINAL = toy_latent(10)
OTHER = toy_latent(11)


def _guidance(energy, chunk=0):
    image = DEC(ORIGINAL)[0].permute(1, 2, 0)
    return IdentityGuidance.from_image(FACE, DEC, image, energy, chunk=chunk)


def _run(lam, energy, data_mean, steps=20, strength=0.6, batch=4, seed=0, stats=None, through_unet=False):
    sigmas = ddim_sigmas(MS, steps, strength)
    noise = torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    x = ORIGINAL + sigmas[0] * noise  # Eq. 1 in k-diffusion form, several noisings of one latent
    model = GaussianDenoiser(data_mean, 0.3)
    return sample_guided_ddim(model, x, sigmas, guidance=_guidance(energy), scale=lam, stats=stats,
                              through_unet=through_unet)


def _distance_to_original(latents):
    g = _guidance(hide_energy())
    with torch.no_grad():
        return (1 - F.cosine_similarity(g.embed(latents), g.reference[None])).mean().item()


def test_anonymization_moves_identity_away_monotonically_in_lambda():
    dists = [_distance_to_original(_run(lam, anonymize_energy(1.0, 0.0), ORIGINAL))
             for lam in (0.0, 1.0, 2.0, 4.0, 8.0)]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists
    assert dists[-1] - dists[0] > 0.3, dists


def test_hiding_moves_identity_towards_the_original_monotonically_in_lambda():
    # the data pull towards another identity; guidance must pull back to the original's
    dists = [_distance_to_original(_run(lam, hide_energy(), OTHER, strength=0.8, batch=1))
             for lam in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(dists, dists[1:])), dists
    assert dists[0] - dists[-1] > 0.5, dists


def test_diversity_spreads_the_outputs_apart():
    def mean_pair_cos(latents):
        with torch.no_grad():
            e = _guidance(hide_energy()).embed(latents)
        sim = e @ e.t()
        return sim[torch.triu_indices(4, 4, 1).unbind()].mean().item()
    plain = mean_pair_cos(_run(0.0, anonymize_energy(0.0, 1.0), ORIGINAL))
    spread = mean_pair_cos(_run(4.0, anonymize_energy(0.0, 1.0), ORIGINAL))
    assert spread < plain - 0.1, (plain, spread)


def test_step_applies_the_paper_correction_in_k_diffusion_form():
    sigmas = ddim_sigmas(MS, 10, 0.5)[:2]
    x = ORIGINAL + sigmas[0] * toy_latent(5)
    model = GaussianDenoiser(OTHER, 0.5)
    g = _guidance(hide_energy())
    out = sample_guided_ddim(model, x, sigmas, guidance=g, scale=0.7)
    den = model(x, sigmas[:1])
    _, grad = g.energy_and_grad(den)
    expected = ddim_step(x, den, sigmas[0], sigmas[1]) - 0.7 * vp_scale(sigmas[1]) * grad
    assert torch.allclose(out, expected, atol=1e-5)
    assert grad.abs().max() > 0


def test_through_unet_gradient_is_the_chain_rule_through_the_prediction():
    # For Gaussian data d x0_hat / d x = std^2 / (std^2 + sigma^2), so dE/dz_t = vp(sigma) * c * dE/dx0_hat.
    sigmas = ddim_sigmas(MS, 10, 0.5)[:2]
    x = ORIGINAL + sigmas[0] * toy_latent(6)
    model = GaussianDenoiser(OTHER, 0.5)
    g = _guidance(hide_energy())
    out = sample_guided_ddim(model, x, sigmas, guidance=g, scale=0.3, through_unet=True)
    den = model(x, sigmas[:1])
    _, grad = g.energy_and_grad(den)
    c = 0.25 / (0.25 + float(sigmas[0]) ** 2)
    expected = ddim_step(x, den, sigmas[0], sigmas[1]) - 0.3 * vp_scale(sigmas[1]) * vp_scale(sigmas[0]) * c * grad
    assert torch.allclose(out, expected, atol=1e-4)


def test_chunked_gradient_equals_full_batch_gradient():
    lat = ORIGINAL + 0.3 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    e_full, g_full = _guidance(anonymize_energy()).energy_and_grad(lat)
    e_chunk, g_chunk = _guidance(anonymize_energy(), chunk=1).energy_and_grad(lat)
    assert e_full == pytest.approx(e_chunk, rel=1e-5)
    assert torch.allclose(g_full, g_chunk, atol=1e-6)


def test_stage_lambda_switches_exactly_at_tau():
    scale = stage_guidance_scale(MS, 0.6, above=1.5, below=2.5)
    assert scale(MS.sigmas[601]) == 1.5 and scale(MS.sigmas[600]) == 2.5 and scale(MS.sigmas[1]) == 2.5
    assert GuidanceScale(1.0)(MS.sigmas[3]) == 1.0
    stats = []
    _run(GuidanceScale(1.5, 0.0, float(MS.sigmas[400]) + 1e-4), hide_energy(), OTHER, steps=10, strength=0.8,
         batch=1, stats=stats)
    lams = [s["lambda"] for s in stats]
    assert lams == [1.5 if s["sigma"] > float(MS.sigmas[400]) + 1e-4 else 0.0 for s in stats] and 0.0 in lams
    assert all(s["grad_norm"] == 0.0 for s in stats if s["lambda"] == 0.0)


def test_runs_under_inference_mode_like_a_comfy_node():
    with torch.inference_mode():
        out = _run(0.05, anonymize_energy(), ORIGINAL, steps=6, batch=2)
        out_u = _run(0.05, anonymize_energy(), ORIGINAL, steps=6, batch=2, through_unet=True)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and torch.isfinite(out_u).all()


def test_bad_face_models_fail_clearly():
    class Blind(ToyFaceModel):
        def detect(self, image):
            return []
    image = DEC(ORIGINAL)[0].permute(1, 2, 0)
    with pytest.raises(NoFaceError):
        IdentityGuidance.from_image(Blind(), DEC, image, hide_energy())
    frozen = ToyFaceModel()
    frozen.differentiable = False
    with pytest.raises(ValueError, match="differentiable"):
        IdentityGuidance.from_image(frozen, DEC, image, hide_energy())


def test_a_non_finite_gradient_or_setting_stops_the_run_with_the_reason():
    class NanFace(ToyFaceModel):
        def embed(self, images, landmarks):
            return super().embed(images, landmarks) * float("nan")
    image = DEC(ORIGINAL)[0].permute(1, 2, 0)
    guidance = IdentityGuidance(NanFace(), DEC, FACE.embed(image.permute(2, 0, 1)[None], None)[0],
                                FACE.detect(image)[0].landmarks, hide_energy())
    sigmas = ddim_sigmas(MS, 6, 0.6)
    x = ORIGINAL + sigmas[0] * toy_latent(3)
    with pytest.raises(ValueError, match="gradient became non-finite at step 0"):
        sample_guided_ddim(GaussianDenoiser(ORIGINAL, 0.3), x, sigmas, guidance=guidance, scale=1.0)
    with pytest.raises(ValueError, match="guidance scale above tau is nan"):
        sample_guided_ddim(GaussianDenoiser(ORIGINAL, 0.3), x, sigmas, guidance=_guidance(hide_energy()),
                           scale=float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        anonymize_energy(1.0, float("nan"))
