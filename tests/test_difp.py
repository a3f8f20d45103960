"""DIFP maths on the tiny model: the dual-CFG guider (Eq. 10) against core DualCFGGuider, one batched UNet call
per step, realism control (Eqs. 12-14) measured on the latents' spectrum, the protection's mask and S_n.
Adapter files are random-weight fixtures with the released layouts (tests/ip_adapter_fixtures.py)."""
from __future__ import annotations

import pytest
import torch

import comfy.model_sampling
import ip_adapter_fixtures as fx
from diffprivacy.methods import difp
from diffprivacy.guidance import identity_streams as ids
from diffprivacy.guidance.ddim import ddim_sigmas
from diffprivacy.guidance.guided_ddim import sample_guided_ddim
from diffprivacy.guidance.ilvr import RealismControl, filter_size, lowpass, lowpass_g
from toy_models import GaussianDenoiser, toy_latent


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_sd, tiny_clip_vision):
    return fx.load_tiny_identity_and_style(tmp_path_factory.mktemp("difp_adapters"), tiny_sd[0], tiny_clip_vision)


@pytest.fixture(scope="module")
def streamed(tiny_sd, tiny_clip_vision, adapters):
    """The tiny MODEL with an identity stream (a random donor) and a style stream (a random image)."""
    face, style = adapters
    with torch.inference_mode():
        g = torch.Generator().manual_seed(1)
        emb = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1)
        on, off = ids.identity_tokens(face, emb)
        s_on, s_off = ids.style_tokens(style, tiny_clip_vision, torch.rand(1, 64, 64, 3, generator=g))
        model, ss = ids.apply_identity_streams(tiny_sd[0], [ids.Stream("identity", face, on, off, 2.0),
                                                            ids.Stream("style", style, s_on, s_off, 2.0)])
    return model, ss


def _cond(seed=4):
    return [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(seed)), {}]]


def _sample(guider, latent, steps=4, seed=0):
    import comfy.samplers
    sigmas = torch.linspace(3.0, 0.0, steps + 1)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return guider.sample(noise, latent, comfy.samplers.ksampler("euler"), sigmas, disable_pbar=True, seed=seed)


# -- the guider ----------------------------------------------------------------------------------------------------
def test_difp_guider_equals_core_dual_cfg_guider_under_the_documented_mapping(streamed):
    """neg = (∅,∅), middle = (∅,sty), pos = (id,∅), cfg1 = s_id, cfg2 = s_id + s_sty: the same samples."""
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    model, _ = streamed
    cond = _cond()
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    s_id, s_sty = 1.7, 0.6
    with torch.inference_mode():
        ours = _sample(difp.difp_guider(model, cond, s_id, s_sty), latent)
        core = Guider_DualCFG(model)
        core.set_conds(ids.set_cond_streams(cond, True, False), ids.set_cond_streams(cond, False, True),
                       ids.set_cond_streams(cond, False, False))
        core.set_cfg(s_id, s_id + s_sty)
        theirs = _sample(core, latent)
        # and the guider is not trivially equal to a single-stream run
        plain = _sample(difp.difp_guider(model, cond, 0.0, 0.0), latent)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3


def test_one_step_is_one_batched_unet_call_with_the_three_entries(streamed, monkeypatch):
    """Every cross-attention patch runs once per step (one UNet pass) on a batch of 3 rows: (∅,∅), (id,∅), (∅,sty)."""
    import comfy.samplers
    model, ss = streamed
    rows = []
    real = comfy.samplers.calc_cond_batch

    def spy(m, conds, x, t, mo):
        out = real(m, conds, x, t, mo)
        rows.append((len(conds), mo["transformer_options"][ids.SWITCHES_KEY]))
        return out
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy)
    before = list(ss.calls)
    with torch.inference_mode():
        guider = difp.difp_guider(model, _cond(), 1.0, 1.0)
        _sample(guider, torch.zeros(1, 4, 16, 16), steps=3)
    assert [c - b for c, b in zip(ss.calls, before)] == [3] * len(ss.layers)  # 3 steps, 3 UNet passes
    assert rows == [(3, {0: (), 1: ("identity",), 2: ("style",)})] * 3
    assert guider.calls == 3


def test_dual_cfg_is_eq_10_and_zero_scales_evaluate_only_the_unconditional_entry():
    e00, e_id, e_sty = torch.tensor(1.0), torch.tensor(3.0), torch.tensor(-2.0)
    assert float(difp.dual_cfg(e00, e_id, e_sty, 0.5, 2.0)) == pytest.approx(1 + 0.5 * 2 + 2.0 * -3)
    assert difp.active_entries(0.0, 0.0) == ["none"]
    assert difp.active_entries(1.0, 0.0) == ["none", "identity"]


# -- realism control -------------------------------------------------------------------------------------------------
MS = comfy.model_sampling.ModelSamplingDiscrete()


def _band(z, lo, hi):
    """Mean |FFT| of a latent over radial frequencies in [lo, hi) (cycles per side)."""
    f = torch.fft.fft2(z.double())
    n = z.shape[-1]
    k = torch.fft.fftfreq(n, 1.0 / n)
    r = (k.view(-1, 1) ** 2 + k.view(1, -1) ** 2).sqrt()
    sel = (r >= lo) & (r < hi)
    return f[..., sel]


def _ilvr_run(g_rea, steps=20, stop_at=1.0, mode="fixed"):
    reference = toy_latent(21, (1, 4, 32, 32))
    data = toy_latent(22, (1, 4, 32, 32))  # the model pulls towards another image
    sigmas = ddim_sigmas(MS, steps, 0.8)
    x = reference + sigmas[0] * toy_latent(23, (1, 4, 32, 32))
    realism = None if g_rea is None else RealismControl(reference, g_rea, mode=mode, stop_at=stop_at, seed=3)
    out = sample_guided_ddim(GaussianDenoiser(data, 0.1), x, sigmas, guidance=None, realism=realism)
    return out, reference, realism


def test_realism_g_to_0_copies_the_references_low_frequencies_and_g_to_1_leaves_the_sample_free():
    free, reference, _ = _ilvr_run(None)
    copied, _, _ = _ilvr_run(0.0)
    loose, _, _ = _ilvr_run(1.0)
    mid, _, _ = _ilvr_run(0.6)
    low = lambda z: _band(z, 0.5, 6)  # noqa: E731  (low frequencies, DC excluded)
    torch.testing.assert_close(low(copied), low(reference), atol=1e-4, rtol=1e-4)
    assert (low(free) - low(reference)).abs().mean() > 0.5  # the unconstrained sample really is elsewhere
    assert float((low(loose) - low(free)).abs().mean()) < 0.02 * float(low(free).abs().mean())
    lowest = lambda z: _band(z, 0.5, 3)  # noqa: E731  (well inside H/2 = 6.5 cycles for g 0.6 at M = 32)
    d_mid = float((lowest(mid) - lowest(reference)).abs().mean())
    assert d_mid < 0.1 * float((lowest(free) - lowest(reference)).abs().mean())  # g 0.6: lows follow the reference
    high = lambda z: _band(z, 12, 16)  # noqa: E731
    assert float((high(mid) - high(reference)).abs().mean()) > 0.5 * float((high(free) - high(reference)).abs().mean())


def test_realism_filter_size_follows_eq_13_and_stops_at_the_stop_step():
    assert filter_size(0.6, 64) == 26 and filter_size(0.0, 64) == 64 and filter_size(1.0, 64) == 1
    assert filter_size(1.0, 64, k=3) == 4
    z = torch.randn(1, 4, 8, 8)
    assert lowpass(z, 8, 8) is z
    _, _, realism = _ilvr_run(0.6, steps=20, stop_at=0.5)
    assert len(realism.g_history) == 8  # 16 steps at S_n 0.8; half of them controlled
    with pytest.raises(ValueError, match="g_rea"):
        filter_size(1.5, 64)


def _ssim_reference(a, b, window=7):
    """SSIM (Wang et al. 2004) with a uniform window, population statistics and the data range of ``b``, averaged
    over channels and the valid region: scipy's uniform filter, independent of guidance.ilvr.ssim."""
    import numpy as np
    from scipy.ndimage import uniform_filter
    a, b = a.double().numpy(), b.double().numpy()
    r = b.max() - b.min()
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    pad = window // 2
    maps = []
    for ca, cb in zip(a, b):
        f = lambda t: uniform_filter(t, window, mode="reflect")[pad:-pad, pad:-pad]  # noqa: E731
        ma, mb = f(ca), f(cb)
        va, vb, cov = f(ca * ca) - ma ** 2, f(cb * cb) - mb ** 2, f(ca * cb) - ma * mb
        maps.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(maps))


def test_adaptive_realism_g_is_the_ssim_of_the_step_and_the_noised_reference_eq_14():
    """Eq. 14: g_rea = SSIM(z'_{t-1}, X_com,t-1) per sample (the reference noised with the control's own seeded
    noise), clamped to [0, 1], and that g sets the filter of that sample's update (Eq. 12-13)."""
    reference = toy_latent(21, (3, 4, 16, 16))
    reference[2] += 5.0  # same local means, opposite structure: SSIM < 0
    x = torch.stack([0.8 * reference[0] + 0.2 * toy_latent(22, (4, 16, 16)),  # close to the reference
                     toy_latent(23, (4, 16, 16)),                             # unrelated
                     10.0 - reference[2]])                                    # anti-correlated
    control = RealismControl(reference, 0.6, mode="adaptive", seed=3)
    sigma = 0.5
    out = control(x, torch.tensor(sigma), 0, 10)
    ref_t = reference + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    want = [_ssim_reference(x[b], ref_t[b]) for b in range(3)]
    assert want[0] > 0.3 > want[1] > 0.0 > want[2], want
    clamped = [min(max(w, 0.0), 1.0) for w in want]
    assert control.g_history == [pytest.approx(clamped, abs=1e-4)]
    expected = torch.cat([x[b:b + 1] - lowpass_g(x[b:b + 1], g) + lowpass_g(ref_t[b:b + 1], g)
                          for b, g in enumerate(control.g_history[0])])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[2], ref_t[2])  # g = 0: the all-pass filter, the sample becomes the reference
    _, _, realism = _ilvr_run(0.6, mode="adaptive")
    gs = [g[0] for g in realism.g_history]
    assert gs[-1] > gs[0]  # as the noised reference and the sample converge, SSIM (so g_rea) rises


# -- protection pieces ----------------------------------------------------------------------------------------------
def test_sn_above_1_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="beyond the last timestep"):
        difp.check_strength(1.2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        difp.check_strength(0.0)
    assert difp.check_strength(0.8) == 0.8


def test_feathered_mask_is_zero_outside_the_grown_box_and_one_at_its_centre():
    m = difp.feathered_box_mask(64, 64, [(24, 24, 40, 40)], grow=0.25, feather=0.25)
    assert float(m[32, 32]) == 1.0 and float(m[0, 0]) == 0.0 and float(m[32, 18]) == 0.0  # 24 - 4 = 20 is the edge
    assert 0.0 < float(m[32, 21]) < 1.0


def test_synthetic_donor_is_beyond_the_threshold_and_same_person_is_warned():
    from toy_models import ToyFaceModel
    fm = ToyFaceModel()
    original = torch.nn.functional.normalize(torch.randn(1, 16), dim=1)
    donor = difp.synthetic_donor(original, fm, seed=5)
    assert float(fm.distance(donor, original)) > fm.threshold
    assert difp.same_person_warning(donor, original, fm) is None
    assert "protects nothing" in difp.same_person_warning(original * 1.0, original, fm)
