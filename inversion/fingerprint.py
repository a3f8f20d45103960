"""Short, stable fingerprints of a diffusion model and a text encoder, so a key file made for
one checkpoint is refused with another.

What is hashed (SHA-256, shown as ``dp2-`` + 16 hex digits):

- only tensors that a checkpoint file holds: a MODEL's ``diffusion_model.*`` and a CLIP's
  ``text_model.*`` (the transformer itself). What ComfyUI makes up around them is left out: the
  noise schedule's buffers (computed), the text encoder's ``logit_scale`` (a constant) and
  ``text_projection.weight``, which SD 1.5 files lack and which ComfyUI 0.3.75 leaves
  uninitialised (so it changes from one load to the next) where newer versions zero-fill it. A key
  made on one ComfyUI version so loads on another with the same checkpoint file. (A bare module
  without those prefixes is hashed whole.)
- the name and shape of each of those tensors (architecture, and which checkpoint family: a
  different layout always gives a different fingerprint);
- the **sign bits** of a deterministic strided sample of the weights: up to 64 floating-point
  tensors evenly spaced in sorted-name order, 4096 evenly spaced elements from each;
- the patches the ModelPatcher applies on top (LoRAs and the like): their target names,
  strengths, scalars, and the shapes and sign bits of their tensors.

Why sign bits rather than the values: ComfyUI loads the same file as fp32 on a CPU, fp16 or bf16
on a GPU, or fp8 on request, and every IEEE rounding keeps the sign (an underflow becomes ±0 with
the sign kept). So the fingerprint is the same for every load of one file on any device and dtype,
while two trainings of a network, or a fine-tune, differ in the signs of their near-zero weights.
A model whose sampled weights differ only in magnitude, not sign, is not told apart: such a change
is too small to matter for recovery. Hooks and model_options (FreeU and the like) are not hashed.

Hashing all 860M parameters of SD 1.5 on every save would take seconds; this reads about 260k
elements. The part from the weights is cached per module object (in a WeakKeyDictionary, so it
never keeps a model alive), the part from the patches per patcher and its ``patches_uuid``.
Weights that ComfyUI has patched in place are read from the patcher's backup (the originals).

Version 1 (``dp1-``, key files written before this rule) hashed every tensor of the state dict. A
recorded ``dp1-`` model fingerprint is still checked with that algorithm (:func:`same_model`); a
``dp1-`` text-encoder fingerprint cannot be (it hashed the uninitialised tensor) and is not checked.
"""
from __future__ import annotations

import hashlib
import weakref

import torch

FINGERPRINT_PREFIX = "dp2-"
LEGACY_PREFIX = "dp1-"  # version 1: every tensor of the state dict
MAX_SAMPLED_TENSORS = 64
SAMPLES_PER_TENSOR = 4096
SAMPLES_PER_PATCH_TENSOR = 256

_weights_digest_cache: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_patches_digest_cache: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


MODEL_TENSORS = "diffusion_model."  # what a MODEL holds from the checkpoint file
CLIP_TENSORS = "text_model."        # what a CLIP holds from it (the transformer, without text_projection)


def model_fingerprint(model_patcher, version: int = 2) -> str:
    """Fingerprint of a ComfyUI MODEL (a ModelPatcher; a bare nn.Module is accepted too).
    ``version`` 1: the algorithm of ``dp1-`` key files (every tensor), for checking those."""
    return _patcher_fingerprint(model_patcher, b"model", MODEL_TENSORS, version)


def clip_fingerprint(clip) -> str:
    """Fingerprint of a ComfyUI CLIP (comfy.sd.CLIP: its text encoder and the patches on it)."""
    patcher = getattr(clip, "patcher", None)
    return _patcher_fingerprint(patcher if patcher is not None else clip.cond_stage_model, b"clip", CLIP_TENSORS, 2)


def same_model(recorded: str, model_patcher) -> bool:
    """Whether a recorded model fingerprint (``dp2-``, or ``dp1-`` from older key files) is this MODEL's."""
    version = 1 if str(recorded).startswith(LEGACY_PREFIX) else 2
    return recorded == model_fingerprint(model_patcher, version)


def same_clip(recorded: str, clip) -> bool | None:
    """Whether a recorded text-encoder fingerprint is this CLIP's; None for a ``dp1-`` one, which cannot be
    checked (it hashed ``text_projection.weight``, uninitialised memory in ComfyUI 0.3.75)."""
    if str(recorded).startswith(LEGACY_PREFIX):
        return None
    return recorded == clip_fingerprint(clip)


def comparable(a: str | None, b: str | None) -> bool:
    """Two recorded fingerprints that can be compared with each other: both present and of this version."""
    return bool(a) and bool(b) and a.startswith(FINGERPRINT_PREFIX) and b.startswith(FINGERPRINT_PREFIX)


def _patcher_fingerprint(obj, kind: bytes, part: str, version: int) -> str:
    module = obj if isinstance(obj, torch.nn.Module) else obj.model
    h = hashlib.sha256(kind)
    h.update(_weights_digest(module, getattr(obj, "backup", None) or {}, part if version >= 2 else None))
    h.update(_patches_digest(obj))
    return (FINGERPRINT_PREFIX if version >= 2 else LEGACY_PREFIX) + h.hexdigest()[:16]


def _checkpoint_names(names: list, part: str | None) -> list:
    """The state-dict names a checkpoint file holds: those with ``part`` as a path component (all names
    when none has it, or when ``part`` is None)."""
    if part is None:
        return names
    held = [n for n in names if n.startswith(part) or f".{part}" in n]
    return held or names


def _sign_bits(t: torch.Tensor, count: int) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > count:
        # integer arithmetic: the same indices on every device (a float linspace rounds differently)
        idx = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // (count - 1)
        flat = flat[idx.to(flat.device)]
    bits = torch.signbit(flat).to("cpu", torch.uint8)
    return bytes(bits.numpy().tobytes())


@torch.no_grad()
def _weights_digest(module: torch.nn.Module, backup: dict, part: str | None) -> bytes:
    cached = _weights_digest_cache.setdefault(module, {})
    if part in cached:
        return cached[part]
    state = module.state_dict()
    names = _checkpoint_names(sorted(state), part)
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    floating = [n for n in names if state[n].is_floating_point() and state[n].numel() > 0]
    if len(floating) > MAX_SAMPLED_TENSORS:
        step = (len(floating) - 1) / (MAX_SAMPLED_TENSORS - 1)
        floating = [floating[round(i * step)] for i in range(MAX_SAMPLED_TENSORS)]
    for name in floating:
        original = backup.get(name)
        tensor = original.weight if original is not None else state[name]
        h.update(name.encode())
        h.update(_sign_bits(tensor, SAMPLES_PER_TENSOR))
    digest = h.digest()
    cached[part] = digest
    return digest


def _patches_digest(obj) -> bytes:
    patches = getattr(obj, "patches", None)
    if not patches:
        return b""
    uuid = getattr(obj, "patches_uuid", None)
    cached = _patches_digest_cache.get(obj)
    if uuid is not None and cached is not None and cached[0] == uuid:
        return cached[1]
    h = hashlib.sha256(b"patches")
    for key in sorted(patches, key=str):
        h.update(repr(key).encode())
        for entry in patches[key]:
            _hash_patch_value(h, entry, depth=0)
    digest = h.digest()
    if uuid is not None:
        _patches_digest_cache[obj] = (uuid, digest)
    return digest


def _hash_patch_value(h, value, depth: int) -> None:
    """Hash one patch entry (strength_patch, adapter or weights, strength_model, offset, function)."""
    if depth > 8:  # patch structures are shallow; stop on anything self-referential
        h.update(b"<deep>")
    elif isinstance(value, torch.Tensor):
        if value.numel() == 1:  # a scalar such as a LoRA alpha: its value, not only its sign
            h.update(f"s{float(value):.6g};".encode())
        else:
            h.update(f"t{tuple(value.shape)};".encode())
            if value.is_floating_point():
                h.update(_sign_bits(value, SAMPLES_PER_PATCH_TENSOR))
    elif isinstance(value, (bool, int, float)):
        h.update(f"n{float(value):.6g};".encode())
    elif value is None or isinstance(value, str):
        h.update(f"v{value!r};".encode())
    elif isinstance(value, (tuple, list)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _hash_patch_value(h, item, depth + 1)
        h.update(b"]")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"k{k!r}".encode())
            _hash_patch_value(h, value[k], depth + 1)
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRAAdapter, LoHa, ...)
        h.update(type(value).__name__.encode())
        _hash_patch_value(h, value.weights, depth + 1)
    else:  # a function or an unknown object: its kind, not its address
        h.update(getattr(value, "__qualname__", type(value).__name__).encode())
