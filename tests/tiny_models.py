"""Random-weight models built with ComfyUI's own classes and written by its own savers.

- ``build_tiny_checkpoint``: a small SD 1.x-family checkpoint (UNet with 32 base channels, a
  64-wide two-layer CLIP text encoder with the real SD1 tokenizer, a TAESD-layout VAE) that the
  stock CheckpointLoaderSimple loads once ``tests/comfy_test_pack`` has registered its type.
- ``build_tiny_clip_vision``: a 24-layer, 32-wide CLIP-vision model (so layers 3, 7, 11, 15, 24
  exist) for the stock CLIPVisionLoader.
- ``build_full_sd15_checkpoint``: the real SD 1.5 layout (860M-parameter UNet, the SD KL VAE,
  CLIP-L text encoder) with random fp16 weights, which stock ComfyUI recognises by itself.

Files are cached outside the clone (``$DP_CACHE/fixtures``), keyed by FIXTURE_VERSION.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

FIXTURE_VERSION = "1"

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def fixture_dir() -> Path:
    base = Path(os.environ.get("DP_CACHE", Path.home() / ".cache" / "diffprivacy-nodes"))
    d = base / "fixtures" / f"v{FIXTURE_VERSION}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip weight initialisation (they expect a checkpoint): give every
    tensor a sane random value. Fan-in scaled normals keep activations O(1) through depth."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 0:
            continue
        if p.ndim == 1:
            is_norm_weight = leaf == "weight" and ("norm" in name or ".ln" in name or "layer_norm" in name)
            if is_norm_weight:
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            else:  # class embeddings and the like
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            continue
        fan_in = math.prod(p.shape[1:])
        p.copy_((torch.randn(p.shape, generator=g) / math.sqrt(fan_in)).to(p.dtype))


def _tiny_parts(seed: int):
    import comfy.model_patcher
    import comfy.sd
    import comfy.taesd.taesd
    from comfy_test_pack import TINY_UNET_CONFIG, TinySD15

    cfg = TinySD15(dict(TINY_UNET_CONFIG))
    model = cfg.get_model({}, "")
    random_init_(model.diffusion_model, seed)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=cfg.clip_target(), model_options={"dtype": torch.float32})
    random_init_(clip.cond_stage_model, seed + 1)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    random_init_(taesd, seed + 2)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    return patcher, clip, vae


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.sd
    patcher, clip, vae = _tiny_parts(seed)
    tmp = Path(str(path) + ".tmp")
    comfy.sd.save_checkpoint(str(tmp), patcher, clip, vae, metadata={"diffprivacy_fixture": f"tiny-sd15-seed{seed}"})
    os.replace(tmp, path)
    return path


def build_tiny_clip_vision(path: Path, seed: int = 3) -> Path:
    import comfy.clip_vision
    import comfy.utils
    from comfy_test_pack import TINY_VISION_JSON

    cv = comfy.clip_vision.ClipVisionModel(TINY_VISION_JSON)
    random_init_(cv.model, seed)
    tmp = Path(str(path) + ".tmp")
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in cv.get_sd().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def build_full_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """SD 1.5's real layout with random fp16 weights (~2 GB), through ComfyUI's CheckpointSave path."""
    import comfy.ldm.models.autoencoder
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    cfg.set_inference_dtype(torch.float16, None)
    model = cfg.get_model({}, "")
    random_init_(model.diffusion_model, seed)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=cfg.clip_target(), model_options={"dtype": torch.float16})
    random_init_(clip.cond_stage_model, seed + 1)
    kl = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    random_init_(kl, seed + 2)
    vae = comfy.sd.VAE(sd={k: v.half() for k, v in kl.state_dict().items()})
    del kl
    tmp = Path(str(path) + ".tmp")
    comfy.sd.save_checkpoint(str(tmp), patcher, clip, vae, metadata={"diffprivacy_fixture": f"sd15-random-seed{seed}"})
    os.replace(tmp, path)
    return path


def cached(name: str, builder) -> Path:
    path = fixture_dir() / name
    if not path.exists():
        builder(path)
    return path


def tiny_checkpoint_path() -> Path:
    return cached("tiny-sd15.safetensors", build_tiny_checkpoint)


def tiny_clip_vision_path() -> Path:
    return cached("tiny-clip-vision.safetensors", build_tiny_clip_vision)


def full_sd15_checkpoint_path() -> Path:
    return cached("sd15-random-fullsize.safetensors", build_full_sd15_checkpoint)


def build_taesd_decoder(path: Path, latent_channels: int = 4, seed: int = 5) -> Path:
    """A random-weight tiny decoder in the exact layout of ComfyUI's TAESD class (``models/vae_approx``
    files: ``taesd_decoder`` for SD 1.x has 4 latent channels, FLUX's ``taef1_decoder`` 16)."""
    import comfy.taesd.taesd
    import comfy.utils
    dec = comfy.taesd.taesd.Decoder(latent_channels)
    random_init_(dec, seed)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(path))
    return path


class GradientDecoderSpy:
    """A random tiny decoder put in a ``vae_approx`` folder, and a record of what decoded what in one run:
    ``tiny_grads`` (per tiny-decoder call: did its output carry gradients), ``full_calls`` (calls of the full-VAE
    gradient decoder) and ``finals`` (latents the full VAE decoded for the outputs)."""

    def __init__(self, monkeypatch, vae, vae_approx_folder: Path):
        from diffprivacy.guidance import gradient_path as gp
        from diffprivacy.guidance.vae_decode import VaeDecoder
        build_taesd_decoder(vae_approx_folder / "taesd_decoder.safetensors")
        self.tiny_grads, self.full_calls, self.finals = [], [], []
        self.vae, self.vae_decode = vae, vae.decode
        tiny_call, full_call = gp.TinyDecoder.__call__, VaeDecoder.__call__

        def spy_tiny(decoder, latent):
            out = tiny_call(decoder, latent)
            self.tiny_grads.append(out.requires_grad)
            return out
        monkeypatch.setattr(gp.TinyDecoder, "__call__", spy_tiny)
        monkeypatch.setattr(VaeDecoder, "__call__", lambda d, latent: self.full_calls.append(1) or full_call(d, latent))
        monkeypatch.setattr(vae, "decode", lambda z: self.finals.append(z) or self.vae_decode(z))

    def assert_output_is_the_full_vae_decode(self, image: torch.Tensor, model) -> None:
        """The one output decode went through the full VAE (not the tiny decoder, which would differ)."""
        from diffprivacy.guidance import gradient_path as gp
        (final,) = self.finals
        with torch.no_grad():
            assert torch.equal(image, self.vae_decode(final)[..., :3].float().clamp(0, 1))
            tiny = gp.make_gradient_decoder(self.vae, model, gp.GradientOptions(decoder="tiny"))
            assert float((tiny(final).movedim(1, -1).clamp(0, 1) - image).abs().mean()) > 1e-2
