"""Random-weight IP-Adapter / FaceID files with the exact key names and shapes of each kind (never downloaded).

``adapter_state_dict(kind)`` gives the SD 1.5 file's layout by default (16 layers of widths 320..1280, context
768, ViT-H inputs 1024 / 1280, ArcFace 512, FaceID LoRA tensors of rank 128 in the .bin kinds); the ``widths``,
``cross_dim``, ``clip_embed``, ``clip_hidden`` arguments scale it to the tiny test UNet and CLIP-vision model.
Files: flat safetensors (``image_proj.*`` / ``ip_adapter.*``) or a ``.bin`` written with ``torch.save`` of a
plain dict of tensors (nested ``{"image_proj": {...}, "ip_adapter": {...}}`` as the released files, or flat).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SD15_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
TOKENS = {"ip-adapter": 4, "ip-adapter-plus": 16, "faceid": 4, "faceid-plus": 4}


def _rand(g, *shape, dtype):
    fan_in = shape[-1] if len(shape) > 1 else 1
    return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(dtype)


def _perceiver(p: dict, prefix: str, g, c: int, in_dim: int, depth: int = 4, ff_mult: int = 4, dtype=torch.float16):
    inner = c  # heads * 64 = C in the released files (12 heads for C = 768)
    p[prefix + "proj_in.weight"] = _rand(g, c, in_dim, dtype=dtype)
    p[prefix + "proj_in.bias"] = torch.zeros(c, dtype=dtype)
    p[prefix + "proj_out.weight"] = _rand(g, c, c, dtype=dtype)
    p[prefix + "proj_out.bias"] = torch.zeros(c, dtype=dtype)
    p[prefix + "norm_out.weight"], p[prefix + "norm_out.bias"] = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
    for i in range(depth):
        a, f = f"{prefix}layers.{i}.0.", f"{prefix}layers.{i}.1."
        for n in ("norm1", "norm2"):
            p[a + n + ".weight"], p[a + n + ".bias"] = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
        p[a + "to_q.weight"] = _rand(g, inner, c, dtype=dtype)
        p[a + "to_kv.weight"] = _rand(g, 2 * inner, c, dtype=dtype)
        p[a + "to_out.weight"] = _rand(g, c, inner, dtype=dtype)
        p[f + "0.weight"], p[f + "0.bias"] = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
        p[f + "1.weight"] = _rand(g, ff_mult * c, c, dtype=dtype)
        p[f + "3.weight"] = _rand(g, c, ff_mult * c, dtype=dtype)


def adapter_state_dict(kind: str, widths=SD15_WIDTHS, cross_dim: int = 768, clip_embed: int = 1024,
                       clip_hidden: int = 1280, id_dim: int = 512, lora_rank: int | None = 128, seed: int = 0,
                       dtype=torch.float16) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} with the released files' keys and (scaled) shapes."""
    g = torch.Generator().manual_seed(seed)
    c, t = cross_dim, TOKENS[kind]
    p: dict[str, torch.Tensor] = {}
    if kind == "ip-adapter":
        p["proj.weight"], p["proj.bias"] = _rand(g, t * c, clip_embed, dtype=dtype), torch.zeros(t * c, dtype=dtype)
    elif kind == "ip-adapter-plus":
        p["latents"] = (torch.randn(1, t, c, generator=g) / math.sqrt(c)).to(dtype)
        _perceiver(p, "", g, c, clip_hidden, dtype=dtype)
    else:
        hidden = 2 * id_dim
        p["proj.0.weight"], p["proj.0.bias"] = _rand(g, hidden, id_dim, dtype=dtype), torch.zeros(hidden, dtype=dtype)
        p["proj.2.weight"] = _rand(g, t * c, hidden, dtype=dtype)
        p["proj.2.bias"] = (torch.randn(t * c, generator=g) * 0.1).to(dtype)
        if kind == "faceid-plus":
            _perceiver(p, "perceiver_resampler.", g, c, clip_hidden, dtype=dtype)
    if kind != "ip-adapter-plus":
        p["norm.weight"], p["norm.bias"] = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
    ip: dict[str, torch.Tensor] = {}
    for i, w in enumerate(widths):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = _rand(g, w, c, dtype=dtype)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = _rand(g, w, c, dtype=dtype)
    if kind.startswith("faceid") and lora_rank:
        for n in range(2 * len(widths)):  # every processor: self-attention (even n) and cross-attention (odd n)
            w = widths[n // 2]
            kv_in = w if n % 2 == 0 else c
            for name, fan_in in (("to_q", w), ("to_k", kv_in), ("to_v", kv_in), ("to_out", w)):
                ip[f"{n}.{name}_lora.down.weight"] = _rand(g, lora_rank, fan_in, dtype=dtype)
                ip[f"{n}.{name}_lora.up.weight"] = torch.zeros(w, lora_rank, dtype=dtype)
    return {"image_proj": p, "ip_adapter": ip}


def flat(groups: dict) -> dict[str, torch.Tensor]:
    return {f"{grp}.{k}": v for grp, d in groups.items() for k, v in d.items()}


def write_adapter(path: Path, kind: str, nested: bool = True, **shape) -> Path:
    """Write an adapter file: ``.safetensors`` flat, ``.bin`` via torch.save (nested groups or flat)."""
    path = Path(path)
    groups = adapter_state_dict(kind, **shape)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in flat(groups).items()}, str(path))
    else:
        torch.save(groups if nested else flat(groups), str(path))
    return path


def tiny_shape(model, clip_vision=None, lora_rank: int = 4) -> dict:
    """Shape arguments that fit a (tiny) ComfyUI MODEL and CLIP_VISION."""
    from diffprivacy.guidance.identity_streams import cross_attention_layers
    layers = cross_attention_layers(model)
    shape = {"widths": tuple(l.width for l in layers), "cross_dim": layers[0].context_dim, "lora_rank": lora_rank}
    if clip_vision is not None:
        w = clip_vision.model.visual_projection.weight
        shape.update(clip_embed=int(w.shape[0]), clip_hidden=int(w.shape[1]))
    return shape


def write_unet_lora(path: Path, model, rank: int = 4, seed: int = 1, scale: float = 0.05) -> Path:
    """A kohya-format UNet LoRA (``lora_unet_..._attn{1,2}_to_{q,k,v,out_0}``, as the FaceID LoRA files) for
    ``model``."""
    import comfy.lora
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd_weights = model.model.state_dict()
    out = {}
    for lora_key, target in key_map.items():
        if not lora_key.startswith("lora_unet_") or not any(f"_attn{a}_to_" in lora_key for a in (1, 2)):
            continue
        target = target if isinstance(target, str) else target[0]
        w = sd_weights[target]
        o, i = w.shape[0], w.shape[1]
        out[f"{lora_key}.lora_down.weight"] = torch.randn(rank, i, generator=g) * scale
        out[f"{lora_key}.lora_up.weight"] = torch.randn(o, rank, generator=g) * scale
        out[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    save_file(out, str(path))
    return path


def export_arcface_onnx(path: Path) -> Path:
    """A tiny insightface-style IResNet exported to ONNX with a 512-d embedding (the w600k_r50 interface)."""
    from face_fixtures import export_tiny_iresnet
    path.parent.mkdir(parents=True, exist_ok=True)
    export_tiny_iresnet(path, emb=512)
    return path


def cached_sd15_file(kind: str, name: str) -> Path:
    """The SD 1.5-shaped file of ``kind`` (released shapes, random fp16 weights), built once and cached outside the
    clone."""
    import os
    import tiny_models
    d = tiny_models.fixture_dir() / "ipadapter-v1"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    if not path.exists():
        tmp = d / f".{name}.tmp{os.getpid()}{path.suffix}"
        write_adapter(tmp, kind, seed=len(name))
        os.replace(tmp, path)
    return path


def load_tiny_identity_and_style(folder: Path, model, clip_vision):
    """A random FaceID adapter (.bin) and IP-Adapter (.safetensors) fitting the tiny model, loaded as ComfyUI runs a
    loader node (under inference mode): (identity adapter, style adapter)."""
    import torch
    from diffprivacy.guidance import ip_adapter as ipa
    shape = tiny_shape(model, clip_vision)
    with torch.inference_mode():
        face = ipa.load_adapter(write_adapter(folder / "ip-adapter-faceid_sd15.bin", "faceid", **shape))
        style = ipa.load_adapter(write_adapter(folder / "ip-adapter_sd15.safetensors", "ip-adapter", **shape))
    return face, style
