"""Identity and style streams: IP-Adapter's decoupled cross-attention as an attn2 patch on a ModelPatcher clone.

The maths (IP-Adapter, Ye et al. 2023, Eq. 5). In every cross-attention layer l of the UNet, with the layer's
own query Q = x W_q, text keys/values K = c W_k, V = c W_v, and for each stream s (identity, style) its tokens
t_s (T x C, from the adapter's projection of an embedding):

    out_l = Attn(Q, K, V) + sum_s  w_s * lambda_{s,l} * Attn(Q, t_s W'_{k,s,l}, t_s W'_{v,s,l})

with Attn(Q, K, V) = softmax(Q K^T / sqrt(d)) V per head (the UNet's own attention function and head split),
w_s the stream weight, lambda_{s,l} an optional per-layer weight, W' the adapter's ``to_k_ip`` / ``to_v_ip``.
The same Q serves both terms, so the patch replaces ComfyUI's attn2 call (it receives Q, K, V already
projected by the layer and returns the attention before ``to_out``). All 16 SD 1.5 cross-attention layers are
patched, the middle block included: ComfyUI keys the middle layer ``("middle", 0, 0)``.

Off = zero embedding. An entry whose stream is switched off still gets the extra attention term, over the
adapter's projection of a zero embedding (the "unconditional" tokens IP-Adapter was trained with by condition
dropout), never a missing term: ε(z, ∅) in the reference's classifier-free guidance is this.

Which batch entry gets which streams, in order of precedence:

1. a per-condition flag: :func:`set_cond_streams` marks a CONDITIONING (identity on/off, style on/off); the flag
   travels with the condition through ComfyUI's batching (one row per latent), so any guider, including stock
   ``DualCFGGuider``, gets it right whatever order it passes its conds in;
2. a per-cond-index map in ``transformer_options[SWITCHES_KEY]`` = {index in the guider's cond list: streams on},
   read with ``cond_or_uncond`` (the index of each batch chunk). A guider calling
   ``calc_cond_batch(model, [c0, c1, c2], x, t, with_stream_switches(model_options, {0: (), 1: ("identity",),
   2: ("style",)}))`` evaluates (∅,∅), (id,∅), (∅,sty) in one batched UNet call (DIFP's Eq. 10);
3. default: the first cond (index 0, the positive of ``CFGGuider`` / ``KSampler``) gets every stream on, every
   other cond gets them off, as IP-Adapter's own pipeline does for classifier-free guidance.

Public API for the methods built on this (DIFP, DP-Image, FSAP, De-ID):

* :func:`identity_tokens`, :func:`style_tokens`: tokens from embeddings, once per run (differentiable in the
  embedding: FSAP / De-ID optimise it and call :meth:`StreamSet.set_tokens` each step);
* :func:`apply_identity_streams` -> (patched MODEL clone, :class:`StreamSet` handle);
* :func:`set_cond_streams`, :func:`with_stream_switches`, :data:`SWITCHES_KEY`: per-entry switching;
* :func:`face_identity`: the donor's ArcFace embedding (differentiable) and its aligned 224 crop.

Gradients: everything here is torch; under ComfyUI's inference mode call :meth:`StreamSet.thaw` and thaw the
UNet (``guidance.autograd``) inside ``gradients_enabled()``; tokens may then require grad.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from .ip_adapter import FACEID_LORAS, VIT_H, VIT_L, IdentityAdapter
from .weights import require_finite

log = logging.getLogger("diffprivacy")

STREAMS = ("identity", "style")
SWITCHES_KEY = "diffprivacy_stream_switches"  # transformer_options: {cond index: iterable of stream names on}
COND_KEY = "diffprivacy_streams"              # model_conds / apply_model kwarg: (rows, 2) float flags
WRAPPER_KEY = "diffprivacy_identity_streams"


# -- the model's cross-attention layers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    key: tuple          # ComfyUI's attn2 replace key: (block, number, transformer_index)
    width: int          # inner width of the layer's attention (rows of to_k_ip)
    context_dim: int    # width of the context it attends to (columns of to_k_ip)


def check_sd15_family(model) -> None:
    """Refuse models that are not SD 1.x (SDXL, SD 2.x, ...) with a message that says what was given."""
    import comfy.supported_models as sm
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    if cfg is None or isinstance(cfg, sm.SD15):
        return
    name = type(cfg).__name__
    family = ("SDXL" if "SDXL" in name or "SSD1B" in name or "Vega" in name or "KOALA" in name else
              "SD 2.x" if name.startswith("SD2") else name)
    raise ValueError(f"this MODEL is a {family} model ({name}); IP-Adapter / FaceID SD 1.5 files only fit "
                     f"SD 1.5-family "
                     f"checkpoints (context width 768, 16 cross-attention layers). Load an SD 1.5 checkpoint.")


def cross_attention_layers(model) -> list[Layer]:
    """The model's attn2 layers in the adapters' order: input blocks, output blocks, then the middle block."""
    from comfy.ldm.modules.attention import SpatialTransformer
    unet = model.model.diffusion_model

    def scan(block_name, blocks):
        found = []
        for number, blk in enumerate(blocks):
            for mod in blk:
                if isinstance(mod, SpatialTransformer):
                    for ti, tb in enumerate(mod.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            found.append(Layer((block_name, number, ti), tb.attn2.to_k.out_features,
                                               tb.attn2.to_k.in_features))
        return found

    middle = [unet.middle_block] if getattr(unet, "middle_block", None) is not None else []
    return scan("input", unet.input_blocks) + scan("output", unet.output_blocks) + scan("middle", middle)


def check_fits(adapter: IdentityAdapter, layers: list[Layer]) -> None:
    spec = adapter.spec
    have = [(l.width, l.context_dim) for l in layers]
    want = [(w, spec.cross_dim) for w in spec.layer_widths]
    if have != want:
        raise ValueError(f"{adapter.name} ({spec.kind}) was made for {len(want)} cross-attention layers of widths "
                         f"{list(spec.layer_widths)} attending to width {spec.cross_dim} (SD 1.5); this model has "
                         f"{len(have)} layers of widths {[w for w, _ in have]} attending to width "
                         f"{have[0][1] if have else '?'}. Use an SD 1.5 checkpoint with SD 1.5 adapter files.")


# -- streams ---------------------------------------------------------------------------------------------------
@dataclass
class Stream:
    """One stream: its adapter, tokens on (B_e, T, C) and off (1, T, C), weight, per-layer weights, sigma range."""
    name: str
    adapter: IdentityAdapter
    on: torch.Tensor
    off: torch.Tensor
    weight: float = 1.0
    layer_weights: tuple[float, ...] | None = None
    sigma_start: float = math.inf   # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0

    def layer_weight(self, i: int) -> float:
        return self.weight * (self.layer_weights[i] if self.layer_weights is not None else 1.0)

    def active(self, sigmas) -> bool:
        if self.sigma_start == math.inf and self.sigma_end <= 0.0:
            return True  # no range: no device sync per layer
        if sigmas is None:
            return True
        s = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else float(sigmas)
        return self.sigma_end <= s <= self.sigma_start


class StreamSet:
    """The streams one patched model carries; shared by its 16 layer patches (the handle methods use).

    ``set_tokens`` swaps a stream's tokens (e.g. each step of an embedding optimisation) without re-patching.
    """

    def __init__(self, streams: dict[str, Stream], layers: list[Layer]):
        self.streams = dict(streams)
        self.layers = layers
        self._kv_cache: dict = {}
        self._switch_cache: dict = {}
        self.calls = [0] * len(layers)  # how often each layer's patch ran (tests, diagnostics)

    def copy_with(self, streams: dict[str, Stream]) -> "StreamSet":
        return StreamSet({**self.streams, **streams}, self.layers)

    def set_tokens(self, name: str, on: torch.Tensor | None = None, off: torch.Tensor | None = None) -> None:
        s = self.streams[name]
        self.streams[name] = replace(s, on=s.on if on is None else on, off=s.off if off is None else off)
        self._kv_cache.clear()

    def thaw(self) -> None:
        """Make the adapters' weights usable by autograd (inside ``gradients_enabled()``)."""
        from .autograd import thaw_inference_tensors
        for s in self.streams.values():
            thaw_inference_tensors(s.adapter)
        self._kv_cache.clear()

    # per-row tokens ----------------------------------------------------------------------------------------------
    def _kv(self, stream: Stream, i: int, device, dtype):
        """K', V' of the on and off tokens stacked: rows 0 = off, 1.. = on entries; cached when no grad flows."""
        grad = torch.is_grad_enabled() and (stream.on.requires_grad or stream.off.requires_grad)
        key = (stream.name, i, device, dtype, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        if not grad and key in self._kv_cache:
            return self._kv_cache[key]
        layer = stream.adapter.ip_adapter[i]
        w = layer.to_k_ip.weight
        tokens = torch.cat([stream.off.to(device=w.device, dtype=w.dtype),
                            stream.on.to(device=w.device, dtype=w.dtype)])
        kv = (layer.to_k_ip(tokens).to(device=device, dtype=dtype),
              layer.to_v_ip(tokens).to(device=device, dtype=dtype))
        if not grad:
            self._kv_cache[key] = kv
        return kv

    def row_index(self, stream: Stream, extra_options: dict, rows: int, device) -> torch.Tensor | None:
        """Per query row: 0 for off, 1 + j for on with embedding j; None when every row is on with one embedding."""
        flags = extra_options.get(COND_KEY)
        cou = tuple(extra_options.get("cond_or_uncond") or (0,))
        switches = extra_options.get(SWITCHES_KEY)
        b_e = stream.on.shape[0]
        col = STREAMS.index(stream.name) if stream.name in STREAMS else None
        if flags is not None and flags.shape[0] == rows and col is not None:
            on = (flags[:, col] > 0.5).tolist()
            chunks = 1
        else:
            chunks = len(cou) if rows % len(cou) == 0 else 1
            ons = []
            for index in cou[:chunks]:
                if switches is not None:
                    ons.append(stream.name in switches.get(index, ()))
                else:
                    ons.append(index == 0)
            on = [o for o in ons for _ in range(rows // chunks)]
        key = (stream.name, tuple(on), rows, chunks, b_e, str(device))
        if key in self._switch_cache:
            return self._switch_cache[key]
        per = rows // chunks
        if b_e not in (1, per):
            raise ValueError(f"the {stream.name} stream holds {b_e} embeddings but the latent batch is {per}: give one "
                             f"embedding (used for every latent) or one per latent")
        if all(on) and b_e == 1:
            idx = None
        else:
            idx = torch.tensor([(1 + (r % per) % b_e) if o else 0 for r, o in enumerate(on)], device=device)
        self._switch_cache[key] = idx
        return idx


class LayerPatch:
    """ComfyUI attn2 replacement for layer ``i``: Attn(Q, K, V) + sum_s w_s Attn(Q, K'_s, V'_s)."""

    def __init__(self, streams: StreamSet, i: int):
        self.streams, self.i = streams, i

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention
        attn = attention.optimized_attention  # the UNet's own attention, looked up at call time like ComfyUI's
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        out = attn(q, k, v, heads, attn_precision=precision)
        ss = self.streams
        ss.calls[self.i] += 1
        sigmas = extra_options.get("sigmas")
        for stream in ss.streams.values():
            w = stream.layer_weight(self.i)
            if w == 0.0 or not stream.active(sigmas):
                continue
            k_all, v_all = ss._kv(stream, self.i, q.device, q.dtype)
            idx = ss.row_index(stream, extra_options, q.shape[0], q.device)
            if idx is None:
                k_ip = k_all[1:2].expand(q.shape[0], -1, -1)
                v_ip = v_all[1:2].expand(q.shape[0], -1, -1)
            else:
                k_ip, v_ip = k_all[idx], v_all[idx]
            out = out + w * attn(q, k_ip.contiguous(), v_ip.contiguous(), heads, attn_precision=precision)
        return out


# -- switches -------------------------------------------------------------------------------------------------------
def with_stream_switches(model_options: dict, switches: dict[int, tuple[str, ...]]) -> dict:
    """A copy of ``model_options`` telling the patch which streams each cond index gets (see module doc)."""
    unknown = {s for v in switches.values() for s in v} - set(STREAMS)
    if unknown:
        raise ValueError(f"unknown stream(s) {sorted(unknown)}; streams are {STREAMS}")
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    to[SWITCHES_KEY] = {int(i): tuple(v) for i, v in switches.items()}
    mo["transformer_options"] = to
    return mo


def set_cond_streams(conditioning: list, identity: bool, style: bool) -> list:
    """A copy of a CONDITIONING whose entries carry stream flags (precedence 1 in the module doc)."""
    import comfy.conds
    flag = comfy.conds.CONDRegular(torch.tensor([[float(identity), float(style)]]))
    out = []
    for emb, opts in conditioning:
        opts = dict(opts)
        mc = dict(opts.get("model_conds", {}))
        mc[COND_KEY] = flag
        opts["model_conds"] = mc
        out.append([emb, opts])
    return out


def _move_flags_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
    """APPLY_MODEL wrapper: the per-condition flags arrive as a model kwarg; hand them to the attention patches."""
    flags = kwargs.pop(COND_KEY, None)
    if flags is not None:
        transformer_options = dict(transformer_options)
        transformer_options[COND_KEY] = flags
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


# -- tokens -----------------------------------------------------------------------------------------------------------
def clip_vision_widths(clip_vision) -> dict:
    proj = clip_vision.model.visual_projection
    w = getattr(proj, "weight", None)
    if w is None:
        raise ValueError("this CLIP_VISION model has no image projection; IP-Adapter needs CLIP-ViT-H-14")
    return {"projection": int(w.shape[0]), "hidden": int(w.shape[1])}


def check_clip_vision(adapter: IdentityAdapter, clip_vision) -> None:
    spec = adapter.spec
    widths = clip_vision_widths(clip_vision)
    have = widths["projection"] if spec.clip_input == "image_embeds" else widths["hidden"]
    if have == spec.clip_dim:
        return
    want = "CLIP-ViT-H-14 (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)" if spec.clip_dim in VIT_H.values() \
        else f"a CLIP vision model with {spec.clip_input} of width {spec.clip_dim}"
    given = ("CLIP ViT-L/14 (e.g. clip-vit-large-patch14)" if widths == VIT_L else
             "CLIP ViT-H/14" if widths == VIT_H else f"a CLIP vision model of widths {widths}")
    raise ValueError(f"{adapter.name} ({spec.kind}) was trained with {want} in models/clip_vision/; the CLIP_VISION "
                     f"given is {given}, whose {spec.clip_input} have width {have}, not {spec.clip_dim}. Load the "
                     f"ViT-H model with CLIP Vision Loader.")


def _clip_states(adapter, clip_vision, images, crop: bool):
    out = clip_vision.encode_image(images, crop=crop)
    return out[adapter.spec.clip_input]


def zero_pixel_image(clip_vision, n: int = 1) -> torch.Tensor:
    """An IMAGE whose CLIP preprocessing gives all-zero pixel values (the training's dropped image)."""
    mean = torch.tensor(getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073]))
    size = getattr(clip_vision, "image_size", 224)
    return mean.view(1, 1, 1, 3).expand(n, size, size, 3).clone()


def style_tokens(adapter: IdentityAdapter, clip_vision, images: torch.Tensor, crop: bool = True):
    """(on (B, T, C), off (1, T, C)) tokens of style images (ComfyUI IMAGE) for an ip-adapter / -plus file."""
    if adapter.spec.stream != "style":
        raise ValueError(f"{adapter.name} is a {adapter.spec.kind} (identity) adapter; a style stream needs "
                         f"ip-adapter_sd15 or ip-adapter-plus_sd15")
    check_clip_vision(adapter, clip_vision)
    states = _clip_states(adapter, clip_vision, images, crop)
    zero = _clip_states(adapter, clip_vision, zero_pixel_image(clip_vision), False)
    if adapter.spec.kind == "ip-adapter":
        return adapter.tokens(states), adapter.off_tokens()
    return adapter.tokens(clip_states=states), adapter.off_tokens(zero)


def identity_tokens(adapter: IdentityAdapter, embedding: torch.Tensor, clip_vision=None,
                    face_crops: torch.Tensor | None = None, shortcut_scale: float = 1.0):
    """(on (B, T, C), off (1, T, C)) tokens of ArcFace embeddings (B, 512) for a faceid / faceid-plus file.

    Differentiable in ``embedding``. FaceID Plus also needs ``clip_vision`` (ViT-H) and the aligned face crops
    (B, 224, 224, 3) that :func:`face_identity` returns.
    """
    if adapter.spec.stream != "identity":
        raise ValueError(f"{adapter.name} is a {adapter.spec.kind} (style) adapter; an identity stream needs "
                         f"ip-adapter-faceid_sd15.bin or ip-adapter-faceid-plusv2_sd15.bin")
    if embedding.dim() != 2 or embedding.shape[1] != adapter.spec.id_dim:
        raise ValueError(f"{adapter.name} expects {adapter.spec.id_dim}-d ArcFace embeddings (insightface buffalo_l "
                         f"w600k_r50); got shape {tuple(embedding.shape)}")
    if adapter.spec.kind == "faceid":
        return adapter.tokens(embedding), adapter.off_tokens()
    if clip_vision is None or face_crops is None:
        raise ValueError(f"{adapter.name} (FaceID Plus) also reads the face through CLIP-ViT-H: connect clip_vision "
                         f"(and a face embedding made by the Face Embedding node, which keeps the aligned crop)")
    check_clip_vision(adapter, clip_vision)
    states = _clip_states(adapter, clip_vision, face_crops, False)
    zero = _clip_states(adapter, clip_vision, zero_pixel_image(clip_vision), False)
    return adapter.tokens(embedding, states, shortcut_scale), adapter.off_tokens(zero, shortcut_scale)


def recognizer_space_warning(model_name: str) -> str | None:
    """FaceID was trained on insightface buffalo_l's w600k_r50 embeddings; say so for anything else."""
    if "arcface-r50" in model_name and "antelopev2" not in model_name:
        return None
    if "glintr100" in model_name or "arcface-r100" in model_name or "antelopev2" in model_name:
        return (f"the face embedding comes from {model_name} (antelopev2 / glintr100): another embedding space than "
                f"FaceID's (buffalo_l w600k_r50); the identity will transfer poorly. Use arcface-r50 from buffalo_l.")
    return (f"the face embedding comes from {model_name}: FaceID expects ArcFace embeddings from insightface's "
            f"buffalo_l/w600k_r50.onnx (arcface-r50); other recognizers live in other spaces and transfer poorly.")


def face_identity(face_model, images: torch.Tensor, mode: str = "largest", index: int = 0,
                  differentiable: bool = False, mask: torch.Tensor | None = None) -> dict:
    """Detect, choose and embed faces of an IMAGE batch: the FACE_EMBEDDING value.

    Returns ``embedding`` (N, D) (with grad to ``images`` when ``differentiable``), ``crops_224`` (N, 224, 224, 3)
    aligned like insightface's ``norm_crop(image_size=224)`` (FaceID Plus's CLIP input), ``batch_index``,
    ``landmarks`` (N, 5, 2), ``model`` and a ``warning`` about the embedding space (None for buffalo_l r50).
    ``mask`` (H, W): only the faces it covers are candidates (a face crop's own face, not a neighbour in it).
    """
    from .face.align import align_faces, arcface_template
    from .face.base import choose_faces, crop_faces
    from .host import check_interrupt
    rows = []
    for b, img in enumerate(images):
        check_interrupt()
        with torch.no_grad():
            faces = face_model.detect(img)
        faces = crop_faces(faces, mask)
        rows += [(b, f) for f in choose_faces(faces, mode, index, batch_index=b)]
    x = images.permute(0, 3, 1, 2)[[b for b, _ in rows]]
    lm = torch.stack([f.landmarks for _, f in rows]).to(x)
    ctx = torch.enable_grad() if differentiable else torch.no_grad()
    with ctx:
        emb = face_model.embed(x, lm)
    with torch.no_grad():
        crops = align_faces(x, lm, arcface_template(224), 224).permute(0, 2, 3, 1).clamp(0, 1)
    return {"embedding": emb if differentiable else emb.detach().float().cpu(), "crops_224": crops.cpu(),
            "batch_index": [b for b, _ in rows], "landmarks": lm.cpu(), "model": face_model.name,
            "warning": recognizer_space_warning(face_model.name)}


# -- applying ----------------------------------------------------------------------------------------------------
LORA_MARK = "_diffprivacy_faceid_lora"  # attribute set on each weight patch of a FaceID LoRA this module added


def faceid_lora_entries(model) -> dict[str, int]:
    """{weight key: number of FaceID-LoRA patch entries on it} of a ModelPatcher (the ones this module added)."""
    counts = {}
    for key, entries in model.patches.items():
        n = sum(1 for e in entries if getattr(e[1], LORA_MARK, None) is not None)
        if n:
            counts[key] = n
    return counts


def remove_faceid_lora(model) -> int:
    """Take every FaceID LoRA patch this module added off ``model`` (a clone); returns how many entries went."""
    import uuid
    removed = 0
    for key in list(model.patches):
        kept = [e for e in model.patches[key] if getattr(e[1], LORA_MARK, None) is None]
        removed += len(model.patches[key]) - len(kept)
        if kept:
            model.patches[key] = kept
        else:
            del model.patches[key]
    if removed:
        model.patches_uuid = uuid.uuid4()  # the weights change: ComfyUI must re-patch
    return removed


def apply_lora(model, adapter: IdentityAdapter) -> bool:
    """Apply the adapter's FaceID LoRA to ``model`` (a clone) with ComfyUI's LoRA loading; False when it has none.

    Idempotent: a FaceID LoRA an earlier application put on the model is taken off first, so the model carries
    exactly one (this adapter's), never the same LoRA twice.
    """
    remove_faceid_lora(model)
    if adapter.lora is None:
        if adapter.spec.kind in FACEID_LORAS:
            log.warning("[Diff-Privacy] %s runs without its LoRA (%s in models/loras/): FaceID quality drops.",
                        adapter.name, FACEID_LORAS[adapter.spec.kind])
        return False
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(adapter.lora, key_map, log_missing=False)
    if not loaded:
        raise ValueError(f"the LoRA {adapter.lora_name} matches no layer of this model: it is not an SD 1.5 UNet LoRA "
                         f"(expected {FACEID_LORAS.get(adapter.spec.kind, 'the FaceID LoRA')})")
    for patch in loaded.values():
        try:
            setattr(patch, LORA_MARK, adapter.lora_name or adapter.name)
        except AttributeError:
            raise ValueError(f"the LoRA {adapter.lora_name} loads as {type(patch).__name__} patches, which cannot "
                             f"be tracked; use the FaceID LoRA file ({FACEID_LORAS.get(adapter.spec.kind)})") from None
    model.add_patches(loaded, adapter.lora_strength)
    return True


def carried_streams(model) -> StreamSet | None:
    """The StreamSet of the identity streams an earlier :func:`apply_identity_streams` put on ``model``, or None."""
    options = getattr(model, "model_options", None) or {}
    existing = options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return next((p.streams for p in existing.values() if isinstance(p, LayerPatch)), None)


def streams_on(model) -> set[str]:
    """The names of the streams a MODEL carries (set by :func:`apply_identity_streams`); empty for a plain model."""
    found = carried_streams(model)
    return set(found.streams) if found is not None else set()


def apply_identity_streams(model, streams: list[Stream]):
    """A clone of ``model`` (ModelPatcher) with the streams' decoupled attention on every cross-attention layer.

    Idempotent per stream: streams already on ``model`` from an earlier application are kept, a stream of the same
    name is replaced (each stream is present once). The identity stream's FaceID LoRA is applied to the clone once:
    one from an earlier application is taken off first. Returns (clone, StreamSet).
    """
    check_sd15_family(model)
    layers = cross_attention_layers(model)
    for s in streams:
        check_fits(s.adapter, layers)
        if s.layer_weights is not None and len(s.layer_weights) != len(layers):
            raise ValueError(f"{len(s.layer_weights)} layer weights given for {len(layers)} cross-attention layers")
    import comfy.patcher_extension as pe
    from .host import resident_clone
    clone = resident_clone(model, "the MODEL")
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    previous = carried_streams(clone)
    foreign = [k for k, p in existing.items() if not isinstance(p, LayerPatch)]
    if foreign:
        log.warning("[Diff-Privacy] replacing another node's attn2 patches on %d layers", len(foreign))
    named = {s.name: s for s in streams}
    stream_set = previous.copy_with(named) if previous is not None else StreamSet(named, layers)
    for i, layer in enumerate(layers):
        clone.set_model_attn2_replace(LayerPatch(stream_set, i), *layer.key)
    clone.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    clone.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _move_flags_wrapper)
    for s in streams:
        if s.name == "identity":
            apply_lora(clone, s.adapter)
    return clone, stream_set


def sigma_range(model, start_at: float, end_at: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of the sampling fractions [start_at, end_at] (ComfyUI's percent convention)."""
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) and end_at ({end_at}) must satisfy 0 <= start_at <= end_at <= 1")
    if start_at == 0.0 and end_at == 1.0:
        return math.inf, 0.0
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_at)), float(ms.percent_to_sigma(end_at))


def parse_layer_weights(text: str, n: int) -> tuple[float, ...] | None:
    """"" -> None; otherwise n comma-separated numbers (one per cross-attention layer, in the adapters' order)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError as e:
        raise ValueError(f"layer weights must be numbers separated by commas, got {text!r}") from e
    require_finite(values, "layer_weights", f"give {n} ordinary numbers separated by commas (e.g. 1, 1, 0.5, ...), "
                   "or leave it empty for all 1")
    if len(values) != n:
        raise ValueError(f"layer weights: {len(values)} numbers given, the model has {n} cross-attention layers "
                         f"(input 1, 2, 4, 5, 7, 8; output 3-11; middle for SD 1.5)")
    return values
