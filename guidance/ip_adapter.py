"""IP-Adapter and IP-Adapter-FaceID files for SD 1.5: reading, recognising the kind, the projection models.

An adapter file holds two groups of tensors (flat ``image_proj.*`` / ``ip_adapter.*`` keys in a safetensors
file, or a dict of two dicts in a ``.bin``):

* ``image_proj``: a *projection* from an image or face embedding to T context tokens of width C (C = the
  UNet's cross-attention width, 768 for SD 1.5);
* ``ip_adapter``: for each cross-attention layer of the UNet, the extra key and value matrices
  ``N.to_k_ip.weight`` / ``N.to_v_ip.weight`` of shape (hidden, C). N = 1, 3, ..., 31 because the reference
  numbered all 32 attention processors (self-attention even, cross-attention odd) in diffusers' order: input
  blocks, output blocks, middle block. FaceID ``.bin`` files also hold LoRA tensors for every processor
  (``N.to_q_lora.down.weight`` ...); the same LoRA ships separately for ComfyUI as a ``models/loras`` file,
  which is the one applied (see ``identity_streams``), so these are recognised and left unused.

The four kinds, recognised from key names and shapes (never from the file name):

=================== ===================================================== ======= ==============================
kind                projection (keys under ``image_proj``)                tokens  input
=================== ===================================================== ======= ==============================
``ip-adapter``      ImageProjModel: ``proj`` Linear E -> T*C, ``norm``    4       CLIP-vision image embeds (E)
``ip-adapter-plus`` Resampler: ``latents`` (1, T, C), ``proj_in``, 4      16      CLIP-vision penultimate hidden
                    perceiver layers, ``proj_out``, ``norm_out``                  states (257, H)
``faceid``          MLPProjModel: ``proj.0`` 512 -> 1024, GELU,           4       ArcFace embedding (512)
                    ``proj.2`` -> T*C, ``norm``
``faceid-plus``     the FaceID MLP + ``perceiver_resampler`` over CLIP    4       ArcFace (512) + CLIP hidden
                    hidden states; v1: resampler(x, states), v2:                  states of the aligned face
                    x + s * resampler(x, states)
=================== ===================================================== ======= ==============================

FaceID Plus v1 (``ip-adapter-faceid-plus_sd15.bin``) and v2 (``ip-adapter-faceid-plusv2_sd15.bin``) hold the same
tensors under the same names and shapes: the v2 "shortcut" (adding the MLP tokens x back, scaled by s) is a flag
of the reference's ``ProjPlusModel.forward(..., shortcut=True, scale=s)``, not a tensor. The tensors say
"FaceID Plus"; only the released file name says which version, so the version is read from it
(:func:`faceid_plus_version`) and a FaceID Plus file whose name says neither is refused, never guessed.

Every projection is plain torch and differentiable in its inputs: tokens are a differentiable function of the
embeddings (FSAP / De-ID optimise the embedding through them).

"Off" (no condition) is the projection of a *zero* input, as IP-Adapter was trained with condition dropout:
``tutorial_train*.py`` replaces the dropped image embedding (or the CLIP pixel input, for the hidden-state
kinds) by zeros. :meth:`IdentityAdapter.off_tokens` computes exactly that.

Files are read with safetensors, or ``torch.load(weights_only=True)`` for ``.bin``: a pickle that needs code
to load is refused, never executed.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .weights import read_tensor_file

log = logging.getLogger("diffprivacy")

FOLDER = "ipadapter"
KINDS = ("ip-adapter", "ip-adapter-plus", "faceid", "faceid-plus")
STREAM_OF_KIND = {"ip-adapter": "style", "ip-adapter-plus": "style", "faceid": "identity", "faceid-plus": "identity"}
EXPECTED_FILES = {
    "ip-adapter": "ip-adapter_sd15.safetensors",
    "ip-adapter-plus": "ip-adapter-plus_sd15.safetensors",
    "faceid": "ip-adapter-faceid_sd15.bin",
    "faceid-plus": "ip-adapter-faceid-plusv2_sd15.bin",
}
FACEID_PLUS_FILES = {1: "ip-adapter-faceid-plus_sd15.bin", 2: "ip-adapter-faceid-plusv2_sd15.bin"}
FACEID_LORAS = {"faceid": "ip-adapter-faceid_sd15_lora.safetensors",
                "faceid-plus": "ip-adapter-faceid-plusv2_sd15_lora.safetensors"}
DOWNLOAD_HELP = ("IP-Adapter files come from the h94/IP-Adapter (models/) and h94/IP-Adapter-FaceID repositories on "
                 "Hugging Face; the FaceID LoRA files go to models/loras/")
# SD 1.5's 16 cross-attention layers in the reference's order: input blocks 1, 2, 4, 5, 7, 8; output blocks
# 3..11; the middle block.
SD15_LAYER_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
SD15_CROSS_DIM = 768
VIT_H = {"projection": 1024, "hidden": 1280}
VIT_L = {"projection": 768, "hidden": 1024}
DIM_HEAD = 64  # the reference's perceiver head width (heads = inner width / 64)


# -- finding files --------------------------------------------------------------------------------------------
def register_model_folder() -> list[str]:
    """Register ``models/ipadapter`` with ComfyUI's folder_paths, keeping any path extra_model_paths.yaml set.

    Returns the folder list (empty outside ComfyUI, unless DIFFPRIVACY_MODELS_DIR is set).
    """
    try:
        import folder_paths
    except ImportError:
        env = os.environ.get("DIFFPRIVACY_MODELS_DIR")
        return [str(Path(env) / FOLDER)] if env else []
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:  # keep the user's paths first; ours is a fallback
            folder_paths.folder_names_and_paths[FOLDER] = (list(paths) + [default], exts)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(folder_paths.supported_pt_extensions))
    return list(folder_paths.folder_names_and_paths[FOLDER][0])


def adapter_files() -> list[str]:
    """File names in the ipadapter folder(s)."""
    register_model_folder()
    try:
        import folder_paths
        return list(folder_paths.get_filename_list(FOLDER))
    except ImportError:
        return sorted(p.name for d in register_model_folder() if Path(d).is_dir() for p in Path(d).iterdir())


def _missing(what: str, name: str, folder: str, folders: list[str], expected) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} {name!r} was not found in {folders or ['<ComfyUI>/models/' + folder]}. Expected file names: "
        f"{', '.join(expected)} (in models/{folder}/). {DOWNLOAD_HELP}")


def adapter_path(name: str) -> Path:
    """The full path of an adapter file in the ipadapter folder(s); a clear error naming folder and files."""
    folders = register_model_folder()
    try:
        import folder_paths
        full = folder_paths.get_full_path(FOLDER, name)
    except ImportError:
        full = next((str(Path(d) / name) for d in folders if (Path(d) / name).is_file()), None)
    if not full or not Path(full).is_file():
        raise _missing("IP-Adapter file", name, FOLDER, folders, EXPECTED_FILES.values())
    return Path(full)


def lora_files() -> list[str]:
    try:
        import folder_paths
        return list(folder_paths.get_filename_list("loras"))
    except ImportError:
        return []


def lora_path(name: str) -> Path:
    try:
        import folder_paths
        full = folder_paths.get_full_path("loras", name)
        folders = folder_paths.get_folder_paths("loras")
    except ImportError:
        full, folders = None, []
    if not full or not Path(full).is_file():
        raise _missing("LoRA file", name, "loras", folders, FACEID_LORAS.values())
    return Path(full)


def default_lora_name(kind: str) -> str | None:
    """The FaceID LoRA users have for ``kind`` if it is in models/loras, else None."""
    want = FACEID_LORAS.get(kind)
    return want if want and want in lora_files() else None


# -- reading ----------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat tensor dict from a safetensors file or a plain ``.bin`` (nested dicts are flattened with dots)."""
    hint = f"Use the official .bin / .safetensors adapter files ({', '.join(EXPECTED_FILES.values())})."
    return _flatten(read_tensor_file(path, hint))


def _flatten(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


# -- recognising ----------------------------------------------------------------------------------------------
@dataclass
class AdapterSpec:
    kind: str
    num_tokens: int
    cross_dim: int                      # C: the UNet's context width the tokens live in
    layer_widths: tuple[int, ...]       # hidden width of each cross-attention layer (to_k_ip rows)
    id_dim: int | None = None           # ArcFace width (FaceID kinds)
    clip_dim: int | None = None         # CLIP input width: image_embeds (ip-adapter) or hidden states (plus kinds)
    clip_input: str | None = None       # "image_embeds" | "penultimate_hidden_states" | None
    lora_in_file: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def stream(self) -> str:
        return STREAM_OF_KIND[self.kind]

    def describe(self) -> str:
        version = f" v{self.extra['version']}" if "version" in self.extra else ""
        return (f"{self.kind}{version} ({self.stream} stream, {self.num_tokens} tokens of width {self.cross_dim}, "
                f"{len(self.layer_widths)} cross-attention layers)")


def _what_else(keys: list[str]) -> str | None:
    """Names a file that is not an IP-Adapter at all, from its keys."""
    ks = set(keys)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in ks):
        return "a Stable Diffusion checkpoint (it belongs in models/checkpoints/)"
    if any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k or "lora_unet" in k for k in ks):
        return "a LoRA (it belongs in models/loras/; the FaceID LoRA is picked in the adapter loader)"
    if any(k.startswith("vision_model.") or k.startswith("visual.") for k in ks):
        return "a CLIP-vision model (it belongs in models/clip_vision/)"
    if any(k.startswith(("input_blocks.", "down_blocks.", "conv_in.")) for k in ks):
        return "a UNet / diffusion model (it belongs in models/unet/ or models/diffusion_models/)"
    return None


def faceid_plus_version(name: str) -> int | None:
    """2 for a FaceID Plus v2 file name (``...plusv2...``), 1 for v1 (``...faceid-plus...`` without v2), else None."""
    import re
    base = Path(str(name)).name.lower()
    if re.search(r"plus[-_ ]?v2", base):
        return 2
    if re.search(r"face[-_ ]?id[-_ ]?plus(?![-_ ]?v\d)", base):
        return 1
    return None


def detect_kind(sd: dict[str, torch.Tensor], source: str = "the file") -> AdapterSpec:
    """Recognise the adapter kind from key names and shapes; a clear error for anything else."""
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    ipa = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    expected = (f"expected an SD 1.5 IP-Adapter or IP-Adapter-FaceID file ({', '.join(EXPECTED_FILES.values())}) "
                f"with image_proj.* and ip_adapter.* tensors")
    if not proj or not ipa:
        other = _what_else(list(sd))
        what = f"{source} is {other}" if other else f"{source} has no image_proj.* / ip_adapter.* tensors"
        raise ValueError(f"{what}: {expected}. First keys: {sorted(sd)[:4]}")
    numbers = sorted(int(k.split(".")[0]) for k in ipa if k.endswith(".to_k_ip.weight"))
    if not numbers or any(f"{n}.to_v_ip.weight" not in ipa for n in numbers):
        raise ValueError(f"{source}: ip_adapter.* holds no complete to_k_ip / to_v_ip pairs: {expected}")
    if numbers != list(range(1, 2 * len(numbers), 2)):
        raise ValueError(f"{source}: ip_adapter layers are numbered {numbers[:6]}..., expected 1, 3, 5, ...: "
                         f"{expected}")
    ks = [ipa[f"{n}.to_k_ip.weight"] for n in numbers]
    cross = ks[0].shape[1]
    if any(k.dim() != 2 or k.shape[1] != cross for k in ks):
        raise ValueError(f"{source}: to_k_ip matrices disagree on their context width: {expected}")
    widths = tuple(int(k.shape[0]) for k in ks)
    if cross == 2048 or len(numbers) == 70:
        raise ValueError(f"{source} is an SDXL IP-Adapter ({len(numbers)} cross-attention layers, context width "
                         f"{cross}); these nodes work on SD 1.5 models: {expected}")
    if cross == 1024:
        raise ValueError(f"{source} is an adapter for a model with context width 1024 (SD 2.x); these nodes work "
                         f"on SD 1.5 models: {expected}")
    lora_in_file = any("_lora." in k for k in ipa)

    def has(*names):
        return all(n in proj for n in names)

    if has("perceiver_resampler.proj_in.weight", "proj.0.weight", "proj.2.weight", "norm.weight"):
        kind, tokens = "faceid-plus", proj["proj.2.weight"].shape[0] // proj["norm.weight"].shape[0]
        version = faceid_plus_version(source)
        if version is None:
            raise ValueError(f"{source} holds FaceID Plus tensors, but FaceID Plus v1 and v2 files hold exactly the "
                             f"same tensors (v2 adds the MLP tokens back: x + s * resampler, v1 does not) and only "
                             f"the released file name tells them apart. Keep the official name: "
                             f"{FACEID_PLUS_FILES[1]} (v1) or {FACEID_PLUS_FILES[2]} (v2).")
        spec = AdapterSpec(kind, tokens, cross, widths, id_dim=proj["proj.0.weight"].shape[1],
                           clip_dim=proj["perceiver_resampler.proj_in.weight"].shape[1],
                           clip_input="penultimate_hidden_states", lora_in_file=lora_in_file,
                           extra={"version": version})
    elif has("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"):
        spec = AdapterSpec("ip-adapter-plus", proj["latents"].shape[1], cross, widths,
                           clip_dim=proj["proj_in.weight"].shape[1], clip_input="penultimate_hidden_states",
                           lora_in_file=lora_in_file)
    elif has("proj.0.weight", "proj.2.weight", "norm.weight"):
        spec = AdapterSpec("faceid", proj["proj.2.weight"].shape[0] // proj["norm.weight"].shape[0], cross, widths,
                           id_dim=proj["proj.0.weight"].shape[1], lora_in_file=lora_in_file)
    elif has("proj.weight", "norm.weight"):
        spec = AdapterSpec("ip-adapter", proj["proj.weight"].shape[0] // proj["norm.weight"].shape[0], cross,
                           widths, clip_dim=proj["proj.weight"].shape[1], clip_input="image_embeds",
                           lora_in_file=lora_in_file)
    else:
        raise ValueError(f"{source}: its image_proj tensors ({sorted(proj)[:5]}...) match none of the projections "
                         f"IP-Adapter (proj, norm), IP-Adapter Plus (latents, proj_in, ...), FaceID (proj.0, proj.2, "
                         f"norm), FaceID Plus (+ perceiver_resampler): {expected}")
    norm_w = proj.get("norm.weight", proj.get("norm_out.weight"))
    if norm_w is not None and norm_w.shape[0] != cross:
        raise ValueError(f"{source}: the projection makes tokens of width {norm_w.shape[0]} but the layers expect "
                         f"{cross}: a damaged or mixed file")
    return spec


# -- projection models (module names follow the file's keys so state dicts load strictly) ------------------------
class ImageProjModel(nn.Module):
    """tokens = LayerNorm(reshape(W e + b, (T, C))): a CLIP image embedding -> T tokens."""

    def __init__(self, in_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(in_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds):
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.cross_dim))


class MLPProjFaceID(nn.Module):
    """tokens = LayerNorm(reshape(W2 GELU(W1 e + b1) + b2, (T, C))): an ArcFace embedding -> T tokens."""

    def __init__(self, id_dim: int, hidden: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * cross_dim))
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, id_embeds):
        return self.norm(self.proj(id_embeds).reshape(-1, self.tokens, self.cross_dim))


def feed_forward(dim: int, inner: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (Flamingo's perceiver): softmax(q k^T / sqrt(d)) v, multi-head."""

    def __init__(self, dim: int, inner: int, dim_head: int = DIM_HEAD):
        super().__init__()
        self.heads = max(inner // dim_head, 1)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).float(), dim=-1).to(q.dtype)
        return self.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


class PerceiverStack(nn.Module):
    """proj_in, depth x (attention + feed-forward, residual), proj_out, norm_out: states refine latents."""

    def __init__(self, dim: int, in_dim: int, out_dim: int, depth: int, inner: int, ff_inner: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, inner), feed_forward(dim, ff_inner)])
                                    for _ in range(depth))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def refine(self, latents, states):
        x = self.proj_in(states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverStack):
    """IP-Adapter Plus: T learned latents refined over the CLIP hidden states -> T tokens."""

    def __init__(self, dim, in_dim, out_dim, depth, inner, ff_inner, tokens):
        super().__init__(dim, in_dim, out_dim, depth, inner, ff_inner)
        self.latents = nn.Parameter(torch.zeros(1, tokens, dim))

    def forward(self, states):
        return self.refine(self.latents.expand(states.shape[0], -1, -1), states)


class FaceIDPlusProj(nn.Module):
    """FaceID Plus: x = FaceID MLP tokens; r = resampler(x over CLIP states of the aligned face); out = r (v1) or
    x + s * r (v2, ``shortcut``)."""

    def __init__(self, id_dim, hidden, cross_dim, tokens, resampler: PerceiverStack, shortcut: bool = True):
        super().__init__()
        self.tokens, self.cross_dim, self.shortcut = tokens, cross_dim, shortcut
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * cross_dim))
        self.norm = nn.LayerNorm(cross_dim)
        self.perceiver_resampler = resampler

    def forward(self, id_embeds, states, shortcut_scale: float = 1.0):
        x = self.norm(self.proj(id_embeds).reshape(-1, self.tokens, self.cross_dim))
        if states.shape[0] != x.shape[0]:
            states = states.expand(x.shape[0], -1, -1)
        refined = self.perceiver_resampler.refine(x, states)
        return x + shortcut_scale * refined if self.shortcut else refined


def _perceiver_from(sd: dict, prefix: str, cls, **kw):
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "layers.")})
    return cls(sd[f"{prefix}proj_in.weight"].shape[0], sd[f"{prefix}proj_in.weight"].shape[1],
               sd[f"{prefix}proj_out.weight"].shape[0], depth, sd[f"{prefix}layers.0.0.to_q.weight"].shape[0],
               sd[f"{prefix}layers.0.1.1.weight"].shape[0], **kw)


def build_projection(spec: AdapterSpec, proj_sd: dict) -> nn.Module:
    if spec.kind == "ip-adapter":
        return ImageProjModel(spec.clip_dim, spec.cross_dim, spec.num_tokens)
    if spec.kind == "faceid":
        return MLPProjFaceID(spec.id_dim, proj_sd["proj.0.weight"].shape[0], spec.cross_dim, spec.num_tokens)
    if spec.kind == "ip-adapter-plus":
        return _perceiver_from(proj_sd, "", Resampler, tokens=spec.num_tokens)
    resampler = _perceiver_from(proj_sd, "perceiver_resampler.", PerceiverStack)
    return FaceIDPlusProj(spec.id_dim, proj_sd["proj.0.weight"].shape[0], spec.cross_dim, spec.num_tokens, resampler,
                          shortcut=spec.extra.get("version", 2) == 2)


class IPLayer(nn.Module):
    """One cross-attention layer's extra projections: K' = tokens W'_k^T, V' = tokens W'_v^T."""

    def __init__(self, cross_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, width, bias=False)


class IdentityAdapter(nn.Module):
    """One adapter file: its projection (``image_proj``) and per-layer K/V matrices (``ip_adapter``).

    ``lora`` is the FaceID LoRA state dict chosen by the loader (None when absent), with ``lora_name`` and
    ``lora_strength``; :func:`..identity_streams.apply_identity_streams` applies it to the model clone.
    """

    def __init__(self, spec: AdapterSpec, name: str = "adapter"):
        super().__init__()
        self.spec, self.name = spec, name
        self.lora: dict | None = None
        self.lora_name: str | None = None
        self.lora_strength = 1.0
        self.image_proj: nn.Module | None = None
        self.ip_adapter = nn.ModuleList(IPLayer(spec.cross_dim, w) for w in spec.layer_widths)

    # tokens ------------------------------------------------------------------------------------------------------
    def tokens(self, embedding: torch.Tensor | None = None, clip_states: torch.Tensor | None = None,
               shortcut_scale: float = 1.0) -> torch.Tensor:
        """(B, T, C) tokens, differentiable in ``embedding`` and ``clip_states``.

        ``embedding``: (B, id_dim) ArcFace embeddings (FaceID kinds) or (B, E) CLIP image embeds (ip-adapter);
        ``clip_states``: (B, 257, H) CLIP penultimate hidden states (plus kinds).
        """
        p = next(self.image_proj.parameters())
        kind = self.spec.kind
        if kind in ("ip-adapter", "faceid"):
            want = self.spec.id_dim if kind == "faceid" else self.spec.clip_dim
            emb = self._check(embedding, want, "embedding")
            return self.image_proj(emb.to(device=p.device, dtype=p.dtype))
        states = self._check(clip_states, self.spec.clip_dim, "clip_states")
        states = states.to(device=p.device, dtype=p.dtype)
        if kind == "ip-adapter-plus":
            return self.image_proj(states)
        emb = self._check(embedding, self.spec.id_dim, "embedding").to(device=p.device, dtype=p.dtype)
        return self.image_proj(emb, states, shortcut_scale)

    def off_tokens(self, zero_clip_states: torch.Tensor | None = None, shortcut_scale: float = 1.0) -> torch.Tensor:
        """(1, T, C): the projection of a zero embedding (and, for the plus kinds, of the CLIP states of a zero
        pixel input, ``zero_clip_states``), which is what the adapter saw when a condition was dropped."""
        kind, p = self.spec.kind, next(self.image_proj.parameters())
        zeros = torch.zeros(1, self.spec.id_dim or self.spec.clip_dim or 1, device=p.device, dtype=p.dtype)
        if kind in ("ip-adapter", "faceid"):
            return self.tokens(zeros)
        if zero_clip_states is None:
            raise ValueError(f"{self.name} ({kind}) needs the CLIP-vision states of a zero image for its 'off' tokens")
        return self.tokens(zeros if kind == "faceid-plus" else None, zero_clip_states[:1], shortcut_scale)

    def _check(self, t, width, what):
        if t is None:
            raise ValueError(f"{self.name} ({self.spec.kind}) needs {what}")
        if t.shape[-1] != width:
            raise ValueError(f"{self.name} ({self.spec.kind}) expects {what} of width {width}, got {tuple(t.shape)}")
        return t


def adapter_from_state_dict(sd: dict[str, torch.Tensor], name: str = "adapter") -> IdentityAdapter:
    spec = detect_kind(sd, name)
    proj_sd = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    adapter = IdentityAdapter(spec, name)
    adapter.image_proj = build_projection(spec, proj_sd)
    try:
        adapter.image_proj.load_state_dict({k: v.float() for k, v in proj_sd.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{name}: the {spec.kind} projection tensors do not fit its layout: {str(e)[:400]}") from e
    for i, layer in enumerate(adapter.ip_adapter):
        n = 2 * i + 1
        layer.to_k_ip.weight.data.copy_(sd[f"ip_adapter.{n}.to_k_ip.weight"].float())
        layer.to_v_ip.weight.data.copy_(sd[f"ip_adapter.{n}.to_v_ip.weight"].float())
    return adapter.eval().requires_grad_(False)


def load_adapter(path: str | Path) -> IdentityAdapter:
    """Read and recognise one adapter file (any of the four kinds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Expected one of {', '.join(EXPECTED_FILES.values())} in "
                                f"models/{FOLDER}/. {DOWNLOAD_HELP}")
    adapter = adapter_from_state_dict(read_state_dict(path), path.name)
    log.info("[Diff-Privacy] IP-Adapter %s: %s", path.name, adapter.spec.describe())
    return adapter


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA state dict (safetensors or a plain tensor file), refusing files that are not LoRAs."""
    path = Path(path)
    sd = read_state_dict(path)
    if not any(".lora_down." in k or ".lora_up." in k or ".lora_A." in k or ".lora_B." in k for k in sd):
        other = _what_else(list(sd))
        if any(k.startswith(("image_proj.", "ip_adapter.")) for k in sd):
            other = "an IP-Adapter file (it belongs in models/ipadapter/)"
        raise ValueError(f"{path.name} is {other or 'not a LoRA'}: expected the FaceID LoRA "
                         f"({', '.join(FACEID_LORAS.values())}) with lora_down/lora_up tensors")
    return sd
