"""Today's ComfyUI (0.38) with dynamic VRAM (issue 29), on its test double (tests/dynamic_vram_double.py): every
gradient node and path makes the resident (non-dynamic) copy of each model it back-propagates through once per loaded
model -- two consecutive runs reload it once --, a model without a reload recipe runs as loaded with one warning
naming the switch, the CLIP that runs is the resident one, and Cancel is not mistaken for a compile failure.

In-process on the tiny models, a few seconds each; the live test server runs with ``--cpu``, where 0.38 has no
dynamic VRAM either.
"""
from __future__ import annotations

import logging

import pytest
import torch

import ip_adapter_fixtures as fx
from dynamic_vram_double import DynamicLoads, ModelPatcher038
from toy_models import ToyFaceModel
from diffprivacy.guidance.host import DISABLE_DYNAMIC_SWITCH

SIZE = 64


@pytest.fixture
def loads(tiny_checkpoint_path, tiny_clip_vision_path):
    """Fresh dynamic loads per test (the resident copy is made once per loaded model: a shared one hides it)."""
    return DynamicLoads(tiny_checkpoint_path, tiny_clip_vision_path)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, tiny_sd, tiny_clip_vision):
    folder = tmp_path_factory.mktemp("dynamic_vram")
    return fx.load_tiny_identity_and_style(folder, tiny_sd[0], tiny_clip_vision)


def _image(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=SIZE, mode="bicubic") \
        .clamp(0, 1).permute(0, 2, 3, 1)


def _cond(seed=4):
    return [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(seed)), {}]]


def _face(dim=16):
    """The toy recognizer, offered as the differentiable one FSAP and De-ID ask for."""
    face = ToyFaceModel(dim=dim)
    face.recognizer = torch.nn.Identity()
    return face


def _resident(patcher, dynamic) -> bool:
    """``patcher`` is a normal patcher on a copy of the weights, not the dynamically loaded ``dynamic``."""
    return type(patcher) is ModelPatcher038 and not patcher.is_dynamic() and patcher.model is not dynamic.model


# -- the double is 0.38 ---------------------------------------------------------------------------------------------
def test_the_double_reloads_on_every_non_dynamic_clone_and_refuses_without_a_factory(loads):
    model, clip, vae = loads.checkpoint()
    first, second = model.clone(disable_dynamic=True), model.clone(disable_dynamic=True)
    assert loads.reloads["model"] == 2 and first.model is not second.model  # what the pack must not do per run
    assert _resident(first, model) and model.clone().model is model.model and model.clone().is_dynamic()
    assert first.clone(disable_dynamic=True).model is first.model  # a normal patcher: a plain clone
    with pytest.raises(RuntimeError, match="Cannot create non-dynamic delegate: cached_patcher_init is not initial"):
        loads.clip_vision().patcher.clone(disable_dynamic=True)
    swapped = clip.clone(disable_dynamic=True)
    assert swapped.cond_stage_model is clip.cond_stage_model is not swapped.patcher.model  # 0.38's incoherent clone


# -- every gradient node and path: the resident copy once across two runs ------------------------------------------
def test_apply_identity_streams_reloads_the_model_once_across_two_runs(loads, adapter_files):
    from diffprivacy.nodes.identity_nodes import DiffPrivacyApplyIdentityStreams
    model, _, _ = loads.checkpoint()
    emb = {"embedding": torch.nn.functional.normalize(torch.randn(1, 512), dim=1), "warning": None}
    with torch.inference_mode():
        runs = [DiffPrivacyApplyIdentityStreams().apply(model, 1.0, 1.0, 0.0, 1.0, identity_adapter=adapter_files[0],
                                                        face_embedding=emb)[0] for _ in range(2)]
    assert loads.reloads == {"model": 1}
    assert all(_resident(r, model) for r in runs) and runs[0].model is runs[1].model


def test_difp_protect_reloads_each_model_once_across_two_runs(loads, adapter_files):
    from diffprivacy.nodes.difp_nodes import DiffPrivacyDIFPProtect
    model, clip, vae = loads.checkpoint()
    cv = loads.clip_vision(factory=True)
    with torch.inference_mode():
        for _ in range(2):
            DiffPrivacyDIFPProtect().protect(
                model, clip, vae, _face(512), _image(), donor="synthetic", strength=0.8, steps=4, s_id=1.5, s_sty=1.0,
                realism="fixed", g_rea=0.6, region="face (feathered mask)", num_outputs=1, seed=0, resolution=SIZE,
                identity_adapter=adapter_files[0], style_adapter=adapter_files[1], clip_vision=cv)
    assert loads.reloads == {"model": 1}


def test_diffusion_de_id_reloads_each_model_once_across_two_runs(loads, adapter_files):
    from diffprivacy.methods import diffusion_deid as deid
    from diffprivacy.inversion.ddim import ddim_invert
    model, _, vae = loads.checkpoint()
    cv = loads.clip_vision(factory=True)
    g = torch.Generator().manual_seed(1)
    appearance_width = int(cv.model.visual_projection.weight.shape[0])
    pool = deid.Pool(torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=1),
                     torch.randn(2, appearance_width, generator=g),
                     torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g), torch.randn(2, 16, generator=g),
                     torch.ones(2, dtype=torch.bool), {"resolution": SIZE})
    settings = deid.DeIDSettings(steps=4, render_steps=2, iterations=1, lambda_att=1.0, lr=1.0, checkpoint=False)
    face = _face()  # made outside inference mode, as a loader node's module is thawed by the method
    with torch.inference_mode():
        for _ in range(2):
            appearance = deid.Appearance(cv)
            assert _resident(appearance.cv.patcher, cv.patcher) and appearance.cv.model is appearance.cv.patcher.model
            deid.anonymize(model, vae, _cond(), adapter_files[0], face, appearance, pool, _image(), settings,
                           invert=ddim_invert)
    assert loads.reloads == {"model": 1, "vae": 1, "clip_vision": 1}


def test_fsap_reloads_each_model_once_across_two_runs(loads, adapter_files):
    from diffprivacy.methods import fsap
    from diffprivacy.inversion.ddim import ddim_invert
    model, _, vae = loads.checkpoint()
    w0 = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    face = _face()
    with torch.inference_mode():
        for _ in range(2):
            fsap.run_fsap(model, vae, _cond(), adapter_files[0], w0, _image(), face,
                          fsap.FSAPSettings(steps=4, k=1, n=1, lambda_p=0.0), invert=ddim_invert, render_final=False)
    assert loads.reloads == {"model": 1, "vae": 1}


def test_key_e_learning_reloads_each_model_once_and_runs_the_resident_text_encoder(loads):
    from diffprivacy.inversion.train_key_e import KeyETrainingOptions, train_key_e
    model, clip, vae = loads.checkpoint()
    cv = loads.clip_vision(factory=True)
    opts = KeyETrainingOptions(steps=1, resolution=SIZE, timesteps_per_step=1, seed=1)
    encoders = []
    with torch.inference_mode():
        for _ in range(2):
            encoders.append(train_key_e(model, clip, vae, cv, _image(), opts)[3])
    assert loads.reloads == {"model": 1, "clip": 1, "clip_vision": 1}
    ran = encoders[0].clip
    assert _resident(ran.patcher, clip.patcher)
    assert ran.cond_stage_model is ran.patcher.model is encoders[1].clip.cond_stage_model  # the loaded one runs
    assert encoders[0].text_model is ran.cond_stage_model.clip_l
    assert encoders[0].text_model is not clip.cond_stage_model.clip_l


def test_difp_training_reloads_the_model_once_across_two_runs(loads):
    from diffprivacy.methods import difp_training as dt
    model, _, _ = loads.checkpoint()
    g = torch.Generator().manual_seed(0)
    data = dt.DIFPDataset(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, generator=g),
                          torch.randn(2, 32, generator=g), torch.zeros(1, 77, 64))
    with torch.inference_mode():
        for _ in range(2):
            dt.train_difp_adapters(model, data, dt.DIFPTrainingOptions(steps=1, batch_size=1))
    assert loads.reloads == {"model": 1}


def test_the_vae_gradient_decoder_reloads_the_vae_once_across_two_runs(loads):
    from diffprivacy.guidance.autograd import gradients_enabled
    from diffprivacy.guidance.vae_decode import make_vae_decoder
    model, _, vae = loads.checkpoint()
    decoders = []
    with torch.inference_mode():
        for _ in range(2):
            decoders.append(make_vae_decoder(vae, model))
            with gradients_enabled():
                z = torch.randn(1, 4, 8, 8, requires_grad=True)
                decoders[-1](z).sum().backward()
                assert z.grad is not None and torch.isfinite(z.grad).all()
    assert loads.reloads == {"vae": 1}
    assert all(_resident(d.patcher, vae.patcher) for d in decoders) and decoders[0].decoder is decoders[1].decoder


def test_clip_vision_features_reload_the_model_once_across_two_runs(loads):
    from diffprivacy.inversion.clip_features import clip_layer_features
    cv = loads.clip_vision(factory=True)
    with torch.inference_mode():
        feats = [clip_layer_features(cv, _image()) for _ in range(2)]
    assert loads.reloads == {"clip_vision": 1} and torch.equal(feats[0], feats[1])


# -- without a reload recipe: the dynamic model, one warning ------------------------------------------------------
def test_a_model_without_a_factory_runs_as_loaded_with_one_warning_naming_the_switch(loads, adapter_files, caplog):
    from diffprivacy.nodes.identity_nodes import DiffPrivacyApplyIdentityStreams
    from diffprivacy.inversion.train_key_e import KeyETrainingOptions, train_key_e
    model, clip, vae = loads.checkpoint(factories=False)
    cv = loads.clip_vision()  # as 0.38's CLIPVisionLoader gives it: no factory either
    emb = {"embedding": torch.nn.functional.normalize(torch.randn(1, 512), dim=1), "warning": None}
    opts = KeyETrainingOptions(steps=1, resolution=SIZE, timesteps_per_step=1, seed=1)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="diffprivacy"):
        for _ in range(2):
            (patched,) = DiffPrivacyApplyIdentityStreams().apply(model, 1.0, 1.0, 0.0, 1.0,
                                                                 identity_adapter=adapter_files[0], face_embedding=emb)
            encoder = train_key_e(model, clip, vae, cv, _image(), opts)[3]
    assert not loads.reloads
    assert patched.is_dynamic() and patched.model is model.model  # it ran on the dynamic model
    assert encoder.clip.cond_stage_model is encoder.clip.patcher.model is clip.cond_stage_model
    warnings = [r.getMessage() for r in caplog.records if "reload recipe" in r.getMessage()]
    assert len(warnings) == 3, warnings  # MODEL, CLIP, CLIP-vision: once each over two runs
    assert all(DISABLE_DYNAMIC_SWITCH in w and "Load Checkpoint" in w for w in warnings)


# -- Cancel -------------------------------------------------------------------------------------------------------
def test_cancel_inside_a_compiled_decoder_is_raised_not_taken_for_a_compile_failure():
    import comfy.model_management as mm
    from diffprivacy.guidance import gradient_path as gp
    calls = []

    def cancelled(*_):
        raise mm.InterruptProcessingException()
    fallback = gp._CompiledFallback.__new__(gp._CompiledFallback)
    fallback.fn, fallback.what, fallback.compiled = (lambda *a: calls.append(a)), "the decoder", cancelled
    with pytest.raises(mm.InterruptProcessingException):
        fallback(1)
    assert fallback.compiled is cancelled and not calls  # still compiled, and no eager re-run after Cancel
