"""The guidance gradient's decoder path made cheap and bounded (issue 17).

Every guided step decodes x0_hat and back-propagates through the decoder. This module chooses and
wraps that decoder:

* which decoder: the model's full VAE, or the tiny one ComfyUI already uses for previews
  (``models/vae_approx/taesd_decoder.*`` for SD 1.x, read with ComfyUI's own ``TAESD`` class), or
  *auto* (the tiny one when its file is there, else the full VAE; the log says which ran). The
  final images are always decoded with the full VAE: only the gradient sees the tiny decoder.
* where: :func:`decode_window` decodes only a latent window (the faces' aligned crops plus a
  margin) instead of the whole frame; :func:`face_windows` finds the windows from the landmarks.
* memory: :func:`auto_chunk` (how many samples to back-propagate at once so the estimated peak
  fits the free memory ComfyUI reports) and :func:`checkpointed_blocks` (gradient checkpointing
  through the decoder's blocks).
* speed: bf16 autocast (:func:`precision_context`) where the GPU supports it, and the opt-in
  ``channels_last`` and ``torch.compile`` (:func:`apply_flags`), each falling back with a logged
  reason.

Window exactness. The tiny decoders are plain convolution stacks in three upsampling stages after a
stem at latent resolution. The stem (about 2% of the work, and where taef2-style decoders put their
GroupNorms) runs on the whole latent; only the upsampling stages run on the window. Their receptive
field is 5 + 2.5 + 0.625 latent pixels, so a margin of 9 reproduces the full-frame decode inside
the window exactly (up to float rounding); the default margin of 6 (48 image pixels) differs from it
by at most ~1/255 (measured on the real taef2 decoder, tests/test_speed_paths.py). Decoders without
that split (the full SD VAE: GroupNorm and attention over the whole frame) decode the cropped latent,
an approximation.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .host import interrupt_exceptions

log = logging.getLogger("diffprivacy")

DECODER_CHOICES = ("full VAE", "tiny", "auto")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
WINDOW_MARGIN = 6        # latent pixels around the faces' crops (see the module doc)
EXACT_WINDOW_MARGIN = 9  # the upsampling stages' receptive field, rounded up: exact window decode
TINY_FOLDER = "vae_approx"


@dataclass
class GradientOptions:
    """How the guidance gradient decodes: the node inputs of issue 17, validated."""
    decoder: str = "full VAE"       # one of DECODER_CHOICES
    face_window: bool = False       # decode only the latent window around the chosen faces
    chunk: int = 0                  # samples back-propagated at once; 0: auto (fits the free memory)
    checkpointing: bool = False     # gradient checkpointing through the decoder's blocks
    precision: str = "auto"         # auto: bf16 autocast on GPUs that support it, else fp32
    channels_last: bool = False     # opt-in
    compile: bool = False           # opt-in torch.compile of the decoder
    window_margin: int = WINDOW_MARGIN

    def __post_init__(self):
        if self.decoder not in DECODER_CHOICES:
            raise ValueError(f"gradient decoder must be one of {DECODER_CHOICES}, got {self.decoder!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"gradient precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        if int(self.chunk) < 0:
            raise ValueError(f"gradient_chunk must be 0 (auto) or a number of outputs, got {self.chunk}")
        if int(self.window_margin) < 0:
            raise ValueError(f"the face window margin must be >= 0 latent pixels, got {self.window_margin}")


# -- the tiny decoder --------------------------------------------------------------------------------
class TinyDecoder:
    """Callable: sampling-space latent (B, C, h, w) -> image (B, 3, 8h, 8w), [0, 1] unclamped, differentiable.

    ComfyUI's TAESD decoder (``comfy.taesd.taesd``), fed as ComfyUI's VAELoader feeds it: the VAE latent
    (``process_out``) shifted and scaled by the latent format (for SD 1.x that is the sampling latent itself).
    ``stem`` / ``rest`` split it before its first upsampling (see :func:`decode_window`).
    """
    downscale = 8

    def __init__(self, sequential: torch.nn.Sequential, process_out: Callable, scale: float, shift: float,
                 name: str, device=None):
        self.module = sequential.eval().requires_grad_(False)
        self.process_out, self.scale, self.shift, self.name = process_out, float(scale), float(shift), name
        self.device = device or torch.device("cpu")
        self.module.to(self.device)
        first_up = next((i for i, m in enumerate(self.module) if isinstance(m, torch.nn.Upsample)), 0)
        self._stem, self._rest = self.module[:first_up], self.module[first_up:]
        self.core = self._rest  # the part torch.compile may replace
        self._thawed = False

    @property
    def description(self) -> str:
        return f"tiny ({self.name})"

    def stem(self, latent: torch.Tensor) -> torch.Tensor:
        if not self._thawed and not torch.is_inference_mode_enabled():
            from .autograd import thaw_inference_tensors
            thaw_inference_tensors(self.module)  # loaded under ComfyUI's inference mode
            self._thawed = True
        x = (self.process_out(latent) - self.shift) * self.scale
        return self._stem(x.to(self.device, _param_dtype(self.module)))

    def rest(self, features: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.core(features).float().to(like.device)

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        return self.rest(self.stem(latent), latent)

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        """Estimated autograd memory per sample: the 64-channel maps kept at each stage's resolution."""
        h, w = latent_hw
        return int(4 * 64 * h * w * (10 + 20 * 4 + 20 * 16 + 12 * 64) * 1.2)


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def tiny_decoder_names(latent_format) -> str:
    name = getattr(latent_format, "taesd_decoder_name", None)
    if not name:
        raise ValueError(f"this model's latent format ({type(latent_format).__name__}) has no tiny decoder in ComfyUI")
    return name


def find_tiny_decoder(latent_format) -> Path | None:
    """The tiny decoder file for this latent format in ComfyUI's ``vae_approx`` folders, as ComfyUI's
    previews find it (the first file whose name starts with e.g. ``taesd_decoder``), or None."""
    import folder_paths
    name = tiny_decoder_names(latent_format)
    hit = next((f for f in folder_paths.get_filename_list(TINY_FOLDER) if Path(f).name.startswith(name)), None)
    full = folder_paths.get_full_path(TINY_FOLDER, hit) if hit else None
    return Path(full) if full else None


def missing_tiny_message(latent_format) -> str:
    import folder_paths
    name = tiny_decoder_names(latent_format)
    folders = ", ".join(folder_paths.get_folder_paths(TINY_FOLDER)) or f"models/{TINY_FOLDER}"
    return (f"no tiny decoder for the gradient: put {name}.safetensors (or {name}.pth) from "
            f"https://github.com/madebyollin/taesd into {folders} (the file ComfyUI's TAESD previews use)")


def check_tiny_layout(sd: dict, path, latent_channels: int) -> None:
    """Refuse a file that is not a TAESD decoder for ``latent_channels`` latents, naming it."""
    import comfy.taesd.taesd
    expected = {k: tuple(v.shape) for k, v in comfy.taesd.taesd.Decoder(latent_channels).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    first = got.get("1.weight")
    if first is not None and len(first) == 4 and first[1] != latent_channels:
        raise ValueError(f"{Path(path).name} is a tiny decoder for {first[1]}-channel latents (e.g. FLUX's taef1 has "
                         f"16, FLUX.2's taef2 32), but this model's latents have {latent_channels}: use the SD 1.x "
                         "taesd_decoder file")
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        odd = sorted(k for k in got if k in expected and got[k] != expected[k])[:3]
        raise ValueError(f"{Path(path).name} does not have ComfyUI's TAESD decoder layout for {latent_channels}-"
                         f"channel latents (missing {missing}, other shapes {odd}, "
                         f"{len(set(got) - set(expected))} extra "
                         "tensors)")


def load_tiny_decoder(path, latent_format, device=None) -> TinyDecoder:
    """ComfyUI's TAESD decoder read from ``path`` for a model of ``latent_format``, layout checked.

    SDXL's ``taesdxl_decoder`` has the very same layout as SD 1.x's ``taesd_decoder`` (4 channels), so
    no layout check can tell them apart: a file named for another model family is refused by its name.
    """
    import comfy.taesd.taesd
    import comfy.utils
    path = Path(path)
    expected = tiny_decoder_names(latent_format)
    stem = path.name.lower()
    for other in ("taesdxl", "taesd3", "taef1", "taef2", "taehv", "taew"):
        if stem.startswith(other) and not expected.startswith(other):
            raise ValueError(f"{path.name} is a tiny decoder for another model family ({other}); this model needs "
                             f"{expected}.*")
    channels = int(getattr(latent_format, "latent_channels", 4))
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    check_tiny_layout(sd, path, channels)
    dec = comfy.taesd.taesd.Decoder(channels)
    dec.load_state_dict(sd)
    return TinyDecoder(dec.float(), latent_format.process_out, getattr(latent_format, "scale_factor", 1.0),
                       getattr(latent_format, "shift_factor", None) or 0.0, path.name, device)


def make_gradient_decoder(vae, model, options: GradientOptions):
    """The decoder the guidance gradient runs through, per ``options.decoder``, with the flags applied."""
    from .vae_decode import make_vae_decoder
    fmt = model.get_model_object("latent_format") if hasattr(model, "get_model_object") else model
    decoder = None
    if options.decoder != "full VAE":
        path = find_tiny_decoder(fmt)
        if path is None:
            if options.decoder == "tiny":
                raise ValueError(missing_tiny_message(fmt))
            log.warning("[Diff-Privacy] gradient decoder auto: %s; using the full VAE", missing_tiny_message(fmt))
        else:
            decoder = load_tiny_decoder(path, fmt, getattr(vae, "device", None))
    if decoder is None:
        decoder = make_vae_decoder(vae, model)
    log.info("[Diff-Privacy] gradient decoder: %s", getattr(decoder, "description", "full VAE"))
    return apply_flags(decoder, options)


def whole_frame_gradient_decoder(vae, model, options: GradientOptions | None, method: str):
    """:func:`make_gradient_decoder` for a method whose gradient decodes the whole frame (FSAP, Diffusion De-ID:
    their differentiable render makes no landmark crops, so the face window does not apply; asked for, it is
    ignored with one warning). ``options`` None: the full VAE."""
    options = options or GradientOptions()
    if options.face_window:
        log.warning("[Diff-Privacy] gradient options: the face window is not used by %s (it has no landmark-based "
                    "face window); its gradient decodes the whole frame", method)
    return make_gradient_decoder(vae, model, options)


# -- the face window -----------------------------------------------------------------------------------
def crop_source_boxes(landmarks: torch.Tensor, template: torch.Tensor, crop_size: int) -> torch.Tensor:
    """(N, 4) pixel boxes (x0, y0, x1, y1) of what an aligned ``crop_size`` crop reads from its image.

    The crop's corners mapped back through the alignment's similarity transform, widened by the
    bilinear sampling's neighbour and the anti-alias pooling factor of :func:`.face.align.align_faces`.
    """
    from .face.align import estimate_similarity, invert_affine
    lm = landmarks.detach().float().reshape(-1, 5, 2)
    m = estimate_similarity(lm, template.float().to(lm.device))
    inv = invert_affine(m)
    s = float(crop_size)
    corners = lm.new_tensor([[-1.0, -1.0, 1.0], [s, -1.0, 1.0], [-1.0, s, 1.0], [s, s, 1.0]])
    src = corners @ inv.transpose(1, 2)                               # (N, 4, 2)
    scale = torch.sqrt(torch.det(m[:, :, :2]).abs()).clamp_min(1e-6)
    pad = (1.0 / scale / 1.5).floor().clamp_min(1.0)[:, None] + 1.0   # pooling factor + one pixel
    lo, hi = src.amin(1) - pad, src.amax(1) + pad
    return torch.cat([lo, hi], dim=1)


def face_windows(landmarks: torch.Tensor, template: torch.Tensor, crop_size: int, latent_hw: tuple[int, int],
                 downscale: int = 8) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """Latent windows ``(y0, y1, x0, x1)`` covering the chosen faces' crops, each with the faces it serves.

    ``landmarks``: (B, F, 5, 2) in pixels of the decoded frame. One window per face (the union over the
    batch) when their areas add up to less than one window around all faces; else that one window.
    """
    b, f = landmarks.shape[:2]
    boxes = crop_source_boxes(landmarks, template, crop_size).reshape(b, f, 4)
    h, w = latent_hw

    def to_latent(box):
        x0, y0 = (int(math.floor(float(v) / downscale)) for v in box[:2])
        x1, y1 = (int(math.floor(float(v) / downscale)) + 1 for v in box[2:])
        return max(0, y0), min(h, y1), max(0, x0), min(w, x1)

    per_face = [to_latent(torch.cat([boxes[:, i, :2].amin(0), boxes[:, i, 2:].amax(0)])) for i in range(f)]
    union = to_latent(torch.cat([boxes[..., :2].reshape(-1, 2).amin(0), boxes[..., 2:].reshape(-1, 2).amax(0)]))

    def area(win):
        return max(0, win[1] - win[0]) * max(0, win[3] - win[2])
    if f > 1 and sum(area(win) for win in per_face) < area(union):
        return [(win, [i]) for i, win in enumerate(per_face)]
    return [(union, list(range(f)))]


def decode_window(decoder, latent: torch.Tensor, window: tuple[int, int, int, int], margin: int) -> torch.Tensor:
    """The decoded image of latent ``window`` (y0, y1, x0, x1), decoding only the window plus ``margin``.

    Decoders with ``stem`` / ``rest`` (the tiny ones) run the stem on the whole latent; others decode the
    cropped latent (see the module doc on exactness).
    """
    y0, y1, x0, x1 = window
    h, w = latent.shape[-2:]
    a, b, c, d = max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)
    if hasattr(decoder, "stem") and hasattr(decoder, "rest"):
        image = decoder.rest(decoder.stem(latent)[..., a:b, c:d], latent)
    else:
        image = decoder(latent[..., a:b, c:d])
    s = image.shape[-1] // (d - c)
    return image[..., (y0 - a) * s:(y1 - a) * s, (x0 - c) * s:(x1 - c) * s]


# -- memory --------------------------------------------------------------------------------------------
GRAD_MEMORY_FACTOR = 3.0  # ComfyUI's decode-memory estimate is for inference; autograd keeps about 3x that


def per_sample_bytes(decoder, latent_hw: tuple[int, int]) -> int:
    """Estimated memory one sample's decode + backward needs."""
    if hasattr(decoder, "activation_bytes"):
        return int(decoder.activation_bytes(latent_hw))
    vae = getattr(decoder, "vae", None)
    estimate = getattr(vae, "memory_used_decode", None)
    if estimate is not None:
        return int(estimate((1, 4, *latent_hw), getattr(vae, "vae_dtype", torch.float32)) * GRAD_MEMORY_FACTOR)
    h, w = latent_hw
    return int(4 * 512 * h * w * 64 * GRAD_MEMORY_FACTOR)


def free_memory(device) -> int:
    try:
        import comfy.model_management as mm
        return int(mm.get_free_memory(device))
    except Exception:  # no host: assume plenty
        return 1 << 62


def auto_chunk(decoder, latent: torch.Tensor, fraction: float = 0.8) -> int:
    """How many samples to back-propagate at once so the estimated peak fits ``fraction`` of the free memory
    ComfyUI reports for the latent's device (0: all of them)."""
    n = latent.shape[0]
    need = per_sample_bytes(decoder, tuple(latent.shape[-2:]))
    fits = int(fraction * free_memory(latent.device) // max(need, 1))
    return 0 if fits >= n else max(1, fits)


@contextlib.contextmanager
def checkpointed_blocks(module: torch.nn.Module | None):
    """Gradient checkpointing through ``module``'s outermost ``*Block`` submodules while the context is open:
    their activations are recomputed in the backward pass instead of kept (less memory, one more forward)."""
    from torch.utils.checkpoint import checkpoint
    patched = []
    if module is not None:
        skip = set()
        for name, sub in module.named_modules():
            if type(sub).__name__.endswith("Block") and not any(name.startswith(p + ".") for p in skip):
                skip.add(name)
                forward = sub.forward
                sub.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(forward)
                patched.append((sub, forward))
    try:
        yield len(patched)
    finally:
        for sub, _ in patched:
            del sub.forward  # back to the class's forward


def decoder_module(decoder) -> torch.nn.Module | None:
    module = getattr(decoder, "module", None)
    return module if module is not None else getattr(decoder, "decoder", None)


# -- precision and the opt-in flags ---------------------------------------------------------------------
def resolve_precision(precision: str, device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: bf16 where supported (auto, bf16), else None (fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        log.warning("[Diff-Privacy] bf16 gradient precision needs a GPU that supports it; %s runs fp32", device)
    return torch.bfloat16 if supported else None


def precision_context(dtype: torch.dtype | None, device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class _CompiledFallback:
    """``torch.compile(fn)``, falling back to ``fn`` (logging why) if compiling or the first call fails."""

    def __init__(self, fn: Callable, what: str):
        self.fn, self.what, self.compiled = fn, what, None
        try:
            self.compiled = torch.compile(fn)
        except Exception as e:  # no compiler backend on this machine, an old torch, ...
            log.warning("[Diff-Privacy] torch.compile of %s unavailable, running eager: %s", what, e)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except interrupt_exceptions():
                raise  # Cancel (an Exception on ComfyUI 0.3.75): not a compile failure, and no eager re-run
            except Exception as e:
                log.warning("[Diff-Privacy] torch.compile of %s failed, running eager from now on: %s",
                            self.what, str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.compiled = None
        return self.fn(*args, **kwargs)


def to_channels_last(module: torch.nn.Module | None, what: str) -> bool:
    """``module``'s 4-D weights in channels_last memory layout (values unchanged); logs why not."""
    if not isinstance(module, torch.nn.Module):
        log.warning("[Diff-Privacy] channels_last: %s has no torch module to convert; left as it is", what)
        return False
    try:
        module.to(memory_format=torch.channels_last)
        return True
    except Exception as e:
        log.warning("[Diff-Privacy] channels_last not applied to %s: %s", what, e)
        return False


def apply_flags(decoder, options: GradientOptions):
    """channels_last and torch.compile on the decoder when asked, each with a logged fallback."""
    if options.channels_last:
        to_channels_last(decoder_module(decoder), "the gradient decoder")
    if options.compile:
        if hasattr(decoder, "core"):
            decoder.core = _CompiledFallback(decoder.core, "the gradient decoder")
        else:
            log.warning("[Diff-Privacy] torch.compile: this decoder has no compilable core; running eager")
    return decoder
