"""Short, stable fingerprints of a diffusion model and a text encoder, so a key file made for
one checkpoint is refused with another.

What is hashed (SHA-256, shown as ``dp1-`` + 16 hex digits):

- the name and shape of every tensor in the state dict (architecture, and which checkpoint
  family: a different layout always gives a different fingerprint);
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
"""
from __future__ import annotations

import hashlib
import weakref

import torch

FINGERPRINT_PREFIX = "dp1-"
MAX_SAMPLED_TENSORS = 64
SAMPLES_PER_TENSOR = 4096
SAMPLES_PER_PATCH_TENSOR = 256

_weights_digest_cache: "weakref.WeakKeyDictionary[torch.nn.Module, bytes]" = weakref.WeakKeyDictionary()
_patches_digest_cache: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def model_fingerprint(model_patcher) -> str:
    """Fingerprint of a ComfyUI MODEL (a ModelPatcher; a bare nn.Module is accepted too)."""
    return _patcher_fingerprint(model_patcher, kind=b"model")


def clip_fingerprint(clip) -> str:
    """Fingerprint of a ComfyUI CLIP (comfy.sd.CLIP: its text encoder and the patches on it)."""
    patcher = getattr(clip, "patcher", None)
    return _patcher_fingerprint(patcher if patcher is not None else clip.cond_stage_model, kind=b"clip")


def _patcher_fingerprint(obj, kind: bytes) -> str:
    module = obj if isinstance(obj, torch.nn.Module) else obj.model
    h = hashlib.sha256(kind)
    h.update(_weights_digest(module, getattr(obj, "backup", None) or {}))
    h.update(_patches_digest(obj))
    return FINGERPRINT_PREFIX + h.hexdigest()[:16]


def _sign_bits(t: torch.Tensor, count: int) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > count:
        # integer arithmetic: the same indices on every device (a float linspace rounds differently)
        idx = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // (count - 1)
        flat = flat[idx.to(flat.device)]
    bits = torch.signbit(flat).to("cpu", torch.uint8)
    return bytes(bits.numpy().tobytes())


@torch.no_grad()
def _weights_digest(module: torch.nn.Module, backup: dict) -> bytes:
    cached = _weights_digest_cache.get(module)
    if cached is not None:
        return cached
    state = module.state_dict()
    names = sorted(state)
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
    _weights_digest_cache[module] = digest
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
