"""The cheap guidance gradient paths of issue 17: tiny decoder, face window, bounded memory, precision, flags.

The face window is checked on a REAL trained decoder (taef2 in ../shared/weights, FLUX.2 latent space) with the
real FaceNet-CASIA on a real photo; the tiny-decoder file handling on random-weight files in the exact layout
of ComfyUI's TAESD class (tests/tiny_models.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import comfy.latent_formats
from conftest import shared_path
from diffprivacy.guidance import gradient_path as gp
from diffprivacy.guidance.energy import anonymize_energy
from diffprivacy.guidance.guided_ddim import IdentityGuidance, _grad_through_unet
from diffprivacy.nodes.encrypt_nodes import DiffPrivacyAnonymize, DiffPrivacyGuidedDDIMSampler, DiffPrivacyHide

SIZE = 384  # the real photo's working size: latent 48 x 48, the face's window about a third of it


# -- the face window on the real taef2 decoder ----------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    from face_fixtures import casia_face_model, small_face_image
    from taef2 import load
    encoder, decoder = load(shared_path("weights"))
    photo = small_face_image(shared_path("data", "photos", "one-face-astronaut.png"), SIZE)
    image = torch.from_numpy(np.array(photo)).float() / 255.0
    with torch.no_grad():
        z = encoder(image.permute(2, 0, 1)[None])
    tiny = gp.TinyDecoder(decoder, lambda x: x, 1.0, 0.0, "taef2_decoder.safetensors")
    return image, z, tiny, casia_face_model()


def _window(guidance, z):
    frame = z.new_empty((1, 0, z.shape[-2] * 8, z.shape[-1] * 8))
    lms = guidance.landmarks_for(frame)
    rec = guidance.face_model.recognizer
    (window, _), = gp.face_windows(lms, rec.template(), rec.crop_size, tuple(z.shape[-2:]))
    return window


def test_face_window_interior_equals_the_full_frame_decode_on_the_real_tiny_decoder(real):
    image, z, tiny, face_model = real
    guidance = IdentityGuidance.from_image(face_model, tiny, image, anonymize_energy(), window_margin=6)
    y0, y1, x0, x1 = window = _window(guidance, z)
    assert (y1 - y0) * (x1 - x0) < 0.35 * z.shape[-1] * z.shape[-2]  # the face's crop is a third of the frame
    with torch.no_grad():
        full = tiny(z)[..., y0 * 8:y1 * 8, x0 * 8:x1 * 8]
        exact = gp.decode_window(tiny, z, window, gp.EXACT_WINDOW_MARGIN)
        default = gp.decode_window(tiny, z, window, gp.WINDOW_MARGIN)
        none = gp.decode_window(tiny, z, window, 0)
    assert exact.shape == full.shape == default.shape
    assert float((exact - full).abs().max()) <= 1e-5          # margin 9 (the receptive field): equal
    assert float((default - full).abs().max()) <= 2.0 / 255    # margin 6 (default): within 2/255 everywhere
    assert float((default - full).abs().mean()) <= 2e-4
    assert float((none - full).abs().max()) > 10 * float((default - full).abs().max())  # the margin matters


def test_face_window_embedding_stays_within_cosine_099_of_the_full_frame(real):
    image, z, tiny, face_model = real
    noisy = z + 0.3 * torch.randn(1, *z.shape[1:], generator=torch.Generator().manual_seed(0))
    full = IdentityGuidance.from_image(face_model, tiny, image, anonymize_energy())
    windowed = IdentityGuidance.from_image(face_model, tiny, image, anonymize_energy(), window_margin=6)
    with torch.no_grad():
        cos = F.cosine_similarity(full.embed(noisy), windowed.embed(noisy), dim=1)
    assert (cos >= 0.99).all(), cos
    e_full, g_full = full.energy_and_grad(noisy)
    e_win, g_win = windowed.energy_and_grad(noisy)
    assert e_win == pytest.approx(e_full, rel=0.02, abs=1e-3)
    y0, y1, x0, x1 = _window(windowed, z)
    m = gp.WINDOW_MARGIN
    outside = torch.ones_like(g_win, dtype=torch.bool)
    outside[..., max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m] = False
    # outside the window only the latent-resolution stem (run on the whole frame) passes gradient: almost none
    assert float(g_win[outside].norm()) < 0.02 * float(g_win.norm())
    assert float(F.cosine_similarity(g_win.flatten(), g_full.flatten(), dim=0)) > 0.9


# -- the tiny decoder file ---------------------------------------------------------------------------------
def test_tiny_decoder_computes_what_comfyui_taesd_decodes(vae_approx, tiny_sd):
    import comfy.taesd.taesd
    from tiny_models import build_taesd_decoder
    model, _, vae = tiny_sd
    path = build_taesd_decoder(vae_approx / "taesd_decoder.safetensors")
    decoder = gp.make_gradient_decoder(vae, model, gp.GradientOptions(decoder="tiny"))
    assert isinstance(decoder, gp.TinyDecoder) and decoder.description == "tiny (taesd_decoder.safetensors)"
    fmt = comfy.latent_formats.SD15()
    taesd = comfy.taesd.taesd.TAESD(None, str(path))   # as ComfyUI's VAELoader reads it: scale from the format
    taesd.vae_scale.data.fill_(fmt.scale_factor)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        comfy_image = (taesd.decode(fmt.process_out(x)) + 1) / 2  # ComfyUI's process_output, unclamped
        ours = decoder(x)
    assert torch.allclose(ours, comfy_image, atol=1e-5)


def test_tiny_decoder_for_another_latent_space_is_refused_naming_the_file(vae_approx, tiny_sd):
    from tiny_models import build_taesd_decoder
    model, _, vae = tiny_sd
    build_taesd_decoder(vae_approx / "taesd_decoder.safetensors", latent_channels=16)  # FLUX's layout, SD 1.x name
    with pytest.raises(ValueError, match=r"taesd_decoder\.safetensors.*16-channel"):
        gp.make_gradient_decoder(vae, model, gp.GradientOptions(decoder="auto"))
    xl = build_taesd_decoder(vae_approx / "taesdxl_decoder.safetensors")  # same layout as SD 1.x: by its name
    with pytest.raises(ValueError, match=r"taesdxl_decoder\.safetensors.*another model family"):
        gp.load_tiny_decoder(xl, comfy.latent_formats.SD15())


def test_missing_tiny_decoder_names_folder_and_file_and_auto_falls_back_saying_so(vae_approx, tiny_sd, caplog):
    model, _, vae = tiny_sd
    with pytest.raises(ValueError, match=rf"taesd_decoder\.safetensors.*{vae_approx}"):
        gp.make_gradient_decoder(vae, model, gp.GradientOptions(decoder="tiny"))
    with caplog.at_level(logging.INFO, logger="diffprivacy"):
        decoder = gp.make_gradient_decoder(vae, model, gp.GradientOptions(decoder="auto"))
    assert decoder.description == "full VAE"
    assert "no tiny decoder" in caplog.text and "using the full VAE" in caplog.text
    assert "gradient decoder: full VAE" in caplog.text


def test_guided_nodes_take_the_gradient_options_with_tooltips():
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyGradientOptions
    required = DiffPrivacyGradientOptions.INPUT_TYPES()["required"]
    assert required["gradient_decoder"][0] == gp.DECODER_CHOICES
    assert required["gradient_decoder"][1]["default"] == "full VAE"  # until measured on real weights
    for name in ("gradient_decoder", "face_window", "gradient_chunk", "gradient_checkpointing",
                 "gradient_precision", "channels_last", "torch_compile"):
        assert required[name][1]["tooltip"], name
    (options,) = DiffPrivacyGradientOptions().options(2, "tiny", True)
    assert options.decoder == "tiny" and options.face_window and options.chunk == 2
    for node in (DiffPrivacyAnonymize, DiffPrivacyHide, DiffPrivacyGuidedDDIMSampler):
        optional = node.INPUT_TYPES()["optional"]
        assert optional["gradient_options"][0] == "GRADIENT_OPTIONS" and optional["gradient_options"][1]["tooltip"]


def test_sampler_node_with_tiny_and_no_file_fails_naming_the_folder(vae_approx, tiny_sd):
    from toy_models import ToyFaceModel
    model, _, vae = tiny_sd
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match="vae_approx"):
        DiffPrivacyGuidedDDIMSampler().sampler(model, vae, ToyFaceModel(), image, "anonymize", 0.4, 1.0, 1.0, 1.0,
                                               "predicted x0 (fast)", resolution=64,
                                               gradient_options=gp.GradientOptions(decoder="tiny"))


# -- bounded memory --------------------------------------------------------------------------------------
class _SavedBytes:
    """The bytes autograd saves for each backward pass (a deterministic stand-in for its activation memory)."""

    def __init__(self, monkeypatch):
        self.now, self.per_backward = 0, []
        grad = torch.autograd.grad

        def recording_grad(*args, **kwargs):
            self.per_backward.append(self.now)
            self.now = 0
            return grad(*args, **kwargs)
        monkeypatch.setattr(torch.autograd, "grad", recording_grad)

    def pack(self, t):
        if not isinstance(t, torch.nn.Parameter):  # weights are saved by reference, whatever the batch
            self.now += t.numel() * t.element_size()
        return t


def _small_setup(chunk=0, checkpointing=False):
    from toy_models import ToyFaceModel
    dec = __import__("comfy.taesd.taesd", fromlist=["Decoder"]).Decoder(4)
    from tiny_models import random_init_
    random_init_(dec, 7)
    tiny = gp.TinyDecoder(dec, lambda x: x, 1.0, 0.0, "random")
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2))
    return IdentityGuidance.from_image(ToyFaceModel(), tiny, image, anonymize_energy(), chunk=chunk,
                                       checkpointing=checkpointing)


def _run_recorded(guidance, z, monkeypatch):
    rec = _SavedBytes(monkeypatch)
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        energy, grad = guidance.energy_and_grad(z)
    return energy, grad, max(rec.per_backward)


def test_chunking_gives_the_same_gradient_with_memory_divided_by_the_chunk_factor(monkeypatch):
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    e_all, g_all, saved_all = _run_recorded(_small_setup(chunk=0), z, monkeypatch)
    e_one, g_one, saved_one = _run_recorded(_small_setup(chunk=1), z, monkeypatch)
    assert e_one == pytest.approx(e_all, rel=1e-5)
    assert torch.allclose(g_one, g_all, atol=1e-6, rtol=1e-4)
    assert saved_one <= saved_all / 4 * 1.05  # chunk 1 of 4: at most a quarter (+5%)


def test_with_chunking_no_decode_sees_more_samples_than_the_chunk(monkeypatch):
    """Also the gradient-free pass that first embeds every output runs chunk by chunk: a batch-4 forward there
    was the floor under chunked memory."""
    guidance = _small_setup(chunk=1)
    seen = []
    real = guidance.decode.rest

    def rest(features, like):
        seen.append(features.shape[0])
        return real(features, like)
    monkeypatch.setattr(guidance.decode, "rest", rest)
    guidance.energy_and_grad(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    assert seen and max(seen) == 1 and len(seen) == 8   # 4 without gradients, then 4 with


def test_checkpointing_gives_the_same_gradient_and_keeps_far_fewer_activations(monkeypatch):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    e0, g0, saved0 = _run_recorded(_small_setup(), z, monkeypatch)
    e1, g1, saved1 = _run_recorded(_small_setup(checkpointing=True), z, monkeypatch)
    assert e1 == pytest.approx(e0, rel=1e-5) and torch.allclose(g1, g0, atol=1e-6, rtol=1e-4)
    assert saved1 < saved0 / 3
    block = _small_setup().decode.module[3]
    assert "forward" not in vars(block)  # the blocks' own forward is back after the pass


def test_auto_chunk_fits_the_free_memory_comfyui_reports(monkeypatch):
    tiny = _small_setup().decode
    z = torch.zeros(4, 4, 64, 64)
    one = gp.per_sample_bytes(tiny, (64, 64))
    monkeypatch.setattr(gp, "free_memory", lambda device: 10 * one)
    assert gp.auto_chunk(tiny, z) == 0  # 8 of 10 fit: all four at once
    monkeypatch.setattr(gp, "free_memory", lambda device: int(2.6 * one))
    assert gp.auto_chunk(tiny, z) == 2
    monkeypatch.setattr(gp, "free_memory", lambda device: one // 10)
    assert gp.auto_chunk(tiny, z) == 1


# -- precision and flags ---------------------------------------------------------------------------------
def test_bf16_is_used_only_where_the_device_supports_it(caplog):
    assert gp.resolve_precision("auto", "cpu") is None
    assert gp.resolve_precision("fp32", "cpu") is None
    with caplog.at_level(logging.WARNING, logger="diffprivacy"):
        assert gp.resolve_precision("bf16", "cpu") is None
    assert "bf16" in caplog.text and "fp32" in caplog.text
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert gp.resolve_precision("auto", "cuda") == torch.bfloat16


def test_through_unet_gradient_of_an_fp16_unet_is_loss_scaled_so_it_does_not_underflow():
    w = torch.full((1, 4, 4, 4), 0.5)

    class Inner:
        manual_cast_dtype = torch.float16

    class FP16Model:
        inner_model = type("Guider", (), {"inner_model": Inner()})()

        def __call__(self, x, sigma, **_):
            return (x.half() * w.half()).float()

    class TinyEnergy:
        def value(self, denoised, step=None):
            return 1e-8 * denoised.sum()  # d/dx = 5e-9: zero in fp16 without scaling

    x = torch.randn(1, 4, 4, 4)
    energy, grad, _ = _grad_through_unet(FP16Model(), x, torch.ones(1), {}, TinyEnergy(), 0)
    assert torch.allclose(grad, torch.full_like(grad, 5e-9), rtol=0.01)


def test_torch_compile_falls_back_to_eager_and_logs_why(monkeypatch, caplog):
    tiny = _small_setup().decode
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = tiny(x)

    def broken(fn):
        def compiled(*a, **k):
            raise RuntimeError("no C compiler found")
        return compiled
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="diffprivacy"):
        flagged = gp.apply_flags(tiny, gp.GradientOptions(compile=True, channels_last=True))
        with torch.no_grad():
            out = flagged(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert "torch.compile of the gradient decoder failed" in caplog.text and "no C compiler" in caplog.text
    assert tiny.module[1].weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_gradient_options_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="gradient decoder"):
        gp.GradientOptions(decoder="huge")
    with pytest.raises(ValueError, match="gradient_chunk"):
        gp.GradientOptions(chunk=-1)
    with pytest.raises(ValueError, match="precision"):
        gp.GradientOptions(precision="fp8")


# -- the GPU suite ----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_suite_without_a_gpu_refuses_unless_dry_and_says_how():
    import subprocess
    from conftest import REPO
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA GPU" in run.stderr and "--dry" in run.stderr
