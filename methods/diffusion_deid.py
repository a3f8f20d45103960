"""Diffusion De-ID (thesis ch. 6, spec §5): dataset anonymization by optimising a face's semantic code, on SD 1.5.

The thesis decodes a DiffAE latent z = (z̄, x_T). Here, on the user's own SD 1.5 checkpoint:

* the semantic code z̄ is the identity embedding of IP-Adapter-FaceID's identity stream (:mod:`.identity_streams`),
  differentiable in the embedding, so it can be optimised;
* the stochastic code x_T is the DDIM-inverted latent (cfg 1, the full S-step grid) of the real image under its own
  identity embedding (``x_t="real"``, the default, the issue's reading), or of the paired fake under the fake's
  embedding (``x_t="fake"``, which also replaces the background: the thesis is unclear which it used), inverted by
  ``inversion.ddim.ddim_invert``.

The algorithm:

1. **Fake pool** X_F, |X_F| > |X_R| (:func:`build_pool`): identity embeddings drawn from a fixed prior that does not
   depend on the set being protected: uniform on the identity recognizer's unit sphere (:func:`draw_identities`; the
   thesis samples fakes from a generator trained on other data, FFHQ, for the same reason: a distribution fitted to
   the real set puts fakes next to real people, e.g. at cosine ~0.4 with two real faces). Each drawn identity is
   checked against every real input's embedding and redrawn while it lies within the identity model's match
   threshold of any of them (:func:`fake_identities`); the smallest real-fake distance is kept in the pool's
   metadata and stated in every report. Each is rendered by the user's checkpoint with the prompt and the identity
   stream (stock DDIM, CFG). The pool stores per fake its embedding, its latent, its appearance embedding and its
   recognizer embedding (when a face is found on it); of the real set only that one distance.
2. **Pairing** (:func:`nearest_fakes`): each real image to its nearest fake by Euclidean distance between appearance
   embeddings (CLIP-vision image embeddings; FaRL's CLS token when FaRL weights are given: :func:`load_farl`).
3. **Anonymisation** (:func:`anonymize`): from the paired fake's embedding, optimise the embedding e_A against

       L = L_id + lambda * L_att
       L_id (IIS, default) = |cos(R(x_A), R(x_R))|                      (Eq. 6.7: identities orthogonal)
       L_id (IRS)          = 1 - |cos(R(x_A), R(x_F))|                  (the ablation: become the fake)
       L_att               = mean |P(x_A) - P(x_R)| / mean |P(x_R)|     (Eq. 6.8, see below)

   with R the differentiable recognizer of the FACE_MODEL (ArcFace in the thesis; FaceNet-CASIA works), applied with
   the real image's landmarks (x_A keeps x_R's layout through x_T), and P the appearance encoder's patch tokens
   (before the final LayerNorm, as FALCO takes FaRL's). x_A is decoded differentiably from the fixed x_T by a short
   DDIM on a subset of the same grid (``render_steps``), gradients through every UNet call, then through the gradient
   decoder (``gradient``: the full VAE by default, or ComfyUI's tiny preview decoder, :mod:`.gradient_path`); the
   final image is the full S-step DDIM render with the best embedding found (lowest L), decoded by the full VAE.

Defaults (the thesis reports none; these are reasoned, not tuned on real weights, which this project does not have):

* ``optimizer="adam"``, ``lr=0.1`` in units of a typical embedding component (|e| / sqrt(512)): Adam's first steps
  move every coordinate by about lr of a component, i.e. the embedding turns by about 6 degrees per step on its sphere
  (it is renormalised to the fake's norm after each step: FaceID embeddings are unit vectors); 30 iterations can turn
  it by most of a right angle, which is what IIS needs from a fake that starts at a small |cos| to the real one.
  Sign-SGD (FSAP's) is the alternative (``optimizer="sign"``).
* ``iterations=30``: each costs render_steps UNet forward+backward passes, a decode and both encoders; 30 x 4 = 120
  passes per image keeps a 512² image near a minute on one GPU (dataset scale), and Adam at lr 0.1 has turned the
  embedding enough by then.
* ``render_steps=4``: the gradient path's DDIM length. Fewer (1) is FSAP's one-call estimate, blurry at t = T where
  x_T lives; more costs linearly. Steps are checkpointed, so memory is one UNet's activations, whatever the count.
* ``lambda_att=1.0``: L_att is made scale-free (divided by the real tokens' mean magnitude: the same gradient
  direction as the thesis's L1, whose raw scale differs between CLIP-L, CLIP-H and FaRL), so L_att is a relative
  error of order 0.1-1 and L_id lies in [0, 1]: weight 1 lets neither term dominate from the start.
* ``steps=50`` (inversion and final render: the grid Diff-Privacy's DDIM uses), pool ``cfg=5``, ``pool_steps=30``.

:data:`METHOD` is step 3 behind the pack's one method contract (:mod:`.contract`): :func:`run` de-identifies each
face crop against a pool built beforehand (the dataset command builds it: it needs the whole set), reporting a
:class:`~..guidance.progress.Step` per iteration with the curve so far in ``detail["history"]``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..guidance.autograd import gradients_enabled, thaw, thaw_diffusion_model, thaw_inference_tensors
from ..guidance.ddim import check_finite, ddim_sigmas, ddim_step
from ..guidance.face.base import NoFaceError, crop_faces
from ..guidance.gradient_path import whole_frame_gradient_decoder
from ..guidance.gradient_path import GradientOptions
from ..guidance.host import check_interrupt, resident_clone
from ..guidance.progress import Progress, report, within
from .contract import CropJob, FaceResult, Method, MethodResult, Models

OBJECTIVES = ("iis", "irs")
X_T_SOURCES = ("real", "fake")
OPTIMIZERS = ("adam", "sign")
POOL_FORMAT = "diffprivacy-deid-pool/1"


@dataclass(frozen=True)
class DeIDSettings:
    """The optimisation's settings, validated once when built."""
    objective: str = "iis"        # "iis": |cos| to the real -> 0; "irs": |cos| to the paired fake -> 1
    x_t: str = "real"             # x_T: DDIM inversion of the real image, or of the paired fake
    optimizer: str = "adam"
    lr: float = 0.1               # in units of a typical embedding component, |e| / sqrt(D)
    iterations: int = 30
    lambda_att: float = 1.0
    steps: int = 50               # DDIM grid of the inversion and the final render
    render_steps: int = 4         # DDIM steps of the differentiable render (a subset of the grid)
    identity_weight: float = 1.0  # the identity stream's weight
    checkpoint: bool = True       # recompute each render step in the backward pass (memory of one UNet call)
    gradient: GradientOptions | None = field(default=None, compare=False)  # the decoder x_A's render goes through

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES} (IIS: identity indistinguishable, the thesis's "
                             f"default; IRS: identity replacement), got {self.objective!r}")
        if self.x_t not in X_T_SOURCES:
            raise ValueError(f"x_t must be one of {X_T_SOURCES}, got {self.x_t!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("lr", "lambda_att", "identity_weight"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for name, low in (("iterations", 0), ("steps", 1), ("render_steps", 1)):
            v = getattr(self, name)
            if int(v) != v or v < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {v}")
        if self.render_steps > self.steps:
            raise ValueError(f"render_steps ({self.render_steps}) cannot exceed steps ({self.steps}): the render "
                             "walks a subset of the inversion's grid")

    @classmethod
    def from_strings(cls, values: dict) -> "DeIDSettings":
        """From a settings dict of strings (the dataset command's --set); unknown names are ignored."""
        out = {}
        for f in cls.__dataclass_fields__.values():
            if f.name in values and f.name != "gradient":  # GradientOptions come from their node, not a string
                v = values[f.name]
                out[f.name] = (str(v).lower() in ("1", "true", "yes") if f.type == "bool" else
                               int(v) if f.type == "int" else float(v) if f.type == "float" else str(v))
        return cls(**out)


# -- pool maths -----------------------------------------------------------------------------------------------------
MAX_REDRAWS_PER_FAKE = 100


def draw_identities(count: int, seed: int, dim: int = 512) -> torch.Tensor:
    """``count`` unit vectors (count, dim) uniform on the sphere, reproducible from ``seed``: the fixed prior fakes are
    drawn from (it depends on nothing but the seed)."""
    g = torch.Generator().manual_seed(int(seed))
    return F.normalize(torch.randn(int(count), int(dim), generator=g, dtype=torch.float64), dim=1).float()


def identity_distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(K, N) distances between unit embeddings: 1 - cos ("cosine") or Euclidean ("l2")."""
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    if metric == "cosine":
        return 1.0 - a @ b.T
    if metric == "l2":
        return torch.cdist(a[None], b[None])[0]
    raise ValueError(f"unknown metric {metric!r}; expected 'cosine' or 'l2'")


def fake_identities(count: int, seed: int, real_embeddings: torch.Tensor, metric: str = "cosine",
                    threshold: float = 0.68) -> tuple[torch.Tensor, dict]:
    """``count`` fake identities from :func:`draw_identities`' prior, each beyond the match ``threshold`` of every
    real embedding (N, D) under ``metric`` (a draw within it is redrawn). Returns (identities (count, D), report:
    the smallest real-fake distance, the metric and threshold, how many draws were rejected)."""
    reals = real_embeddings.detach().float()
    if reals.dim() != 2 or reals.shape[0] < 1:
        raise ValueError(f"the fakes are checked against the real faces' embeddings: got shape {tuple(reals.shape)}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"the identity match threshold must be a finite number > 0, got {threshold}")
    g = torch.Generator().manual_seed(int(seed))
    kept, rejected, budget = [], 0, MAX_REDRAWS_PER_FAKE * int(count)
    while len(kept) < int(count):
        z = F.normalize(torch.randn(1, reals.shape[1], generator=g, dtype=torch.float64), dim=1).float()
        if bool((identity_distances(z, reals, metric) < threshold).any()):
            rejected += 1
            if rejected > budget:
                raise ValueError(f"{rejected} random identities fell within the match threshold {threshold} "
                                 f"({metric}) of a real face: the threshold leaves no room on the sphere; lower it")
            continue
        kept.append(z[0])
    identities = torch.stack(kept)
    smallest = float(identity_distances(identities, reals, metric).min())
    return identities, {"min_real_fake_distance": smallest, "identity_metric": metric,
                        "identity_threshold": float(threshold), "redrawn": rejected}


def nearest_fakes(real: torch.Tensor, fakes: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest fake (Euclidean, 1-NN) for each real appearance embedding: (N,) from (N, A), (K, A).
    ``allowed`` (K,) bool restricts the candidates (IRS needs fakes with a detected face)."""
    d = torch.cdist(real.double()[None], fakes.double()[None])[0]
    if allowed is not None:
        if not bool(allowed.any()):
            raise ValueError("no fake in the pool can be paired (IRS needs fakes on which a face was detected): "
                             "build a larger pool or use the IIS objective")
        d = d.masked_fill(~allowed.bool()[None], math.inf)
    return d.argmin(1)


def identity_loss(emb_a: torch.Tensor, emb_ref: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_id, cos) per row: IIS |cos(a, real)|, IRS 1 - |cos(a, fake)|."""
    cos = F.cosine_similarity(emb_a, emb_ref.to(emb_a).expand_as(emb_a), dim=1)
    return (cos.abs() if objective == "iis" else 1.0 - cos.abs()), cos


def attribute_loss(patches_a: torch.Tensor, patches_r: torch.Tensor) -> torch.Tensor:
    """Eq. 6.8 made scale-free: mean |P_A - P_R| / mean |P_R| per row over all patch tokens."""
    ref = patches_r.to(patches_a)
    return (patches_a - ref).abs().flatten(1).mean(1) / ref.abs().flatten(1).mean(1).clamp_min(1e-8)


# -- the appearance encoder -------------------------------------------------------------------------------------------
class Appearance:
    """A ComfyUI CLIP_VISION model as the appearance encoder: images (B, 3, H, W) in [0, 1] -> (CLS embedding (B, A),
    patch tokens (B, P, C)), differentiable (ComfyUI's own preprocessing rounds to 8 bits, which has no gradient:
    this one resizes the short side, centre-crops and normalises without rounding)."""

    def __init__(self, clip_vision, name: str = "CLIP-vision"):
        for attr in ("model", "patcher"):
            if not hasattr(clip_vision, attr):
                raise ValueError(f"expected a CLIP_VISION model (missing {attr!r}), got {type(clip_vision).__name__}")
        # the copy gradients run through (host.resident_clone; on ComfyUI 0.38 with dynamic VRAM a CLIP-vision model
        # has no reload recipe: it runs as loaded, with a warning)
        self.cv, self.name = resident_clone(clip_vision, f"the {name} model"), name
        self.size = int(getattr(clip_vision, "image_size", 224))
        self.mean = list(getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073]))
        self.std = list(getattr(clip_vision, "image_std", [0.26862954, 0.26130258, 0.27577711]))
        self._thawed = False

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(images.float(), size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import comfy.model_management as mm
        mm.load_model_gpu(self.cv.patcher)
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not self._thawed:
            thaw_inference_tensors(self.cv.model)
            self._thawed = True
        device = getattr(self.cv, "load_device", images.device)
        cls, tokens = self.forward(self.preprocess(images).to(device))
        return cls.float().to(images.device), tokens[:, 1:].float().to(images.device)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ComfyUI's CLIP vision forward written out of place (its layers add in place, which autograd refuses):
        (projected CLS embedding, last hidden state before the final LayerNorm)."""
        from comfy.ldm.modules.attention import optimized_attention_for_device
        vm = self.cv.model.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
        for layer in vm.encoder.layers:
            x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
        pooled = x if getattr(vm, "output_layernorm", False) else vm.post_layernorm(x[:, 0])
        return self.cv.model.visual_projection(pooled), x


FARL_CONFIG = {"hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224, "intermediate_size": 3072,
               "model_type": "clip_vision_model", "num_attention_heads": 12, "num_channels": 3,
               "num_hidden_layers": 12, "patch_size": 16, "projection_dim": 512, "layer_norm_eps": 1e-5,
               "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def load_farl(path: str | Path):
    """FaRL ViT-B/16 (an OpenAI-CLIP-format checkpoint, e.g. FaRL-Base-Patch16-LAIONFace20M-ep64.pth) as a ComfyUI
    CLIP_VISION: its ``visual.*`` tensors converted by ComfyUI's own OpenAI-to-transformers key map, on ComfyUI's CLIP
    vision class with a ViT-B/16 config (ComfyUI ships none). Read with ``weights_only=True``."""
    import tempfile

    import comfy.clip_vision
    from ..guidance.weights import read_tensor_file
    path = Path(path)
    sd = read_tensor_file(path, "Expected a FaRL ViT-B/16 checkpoint (FaRL-Base-Patch16-LAIONFace20M-ep64.pth).")
    sd = sd.get("state_dict", sd)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    if "visual.transformer.resblocks.11.attn.in_proj_weight" not in visual or "visual.proj" not in visual:
        raise ValueError(f"{path.name} is not a FaRL / OpenAI-CLIP ViT-B/16 checkpoint (no visual.transformer with 12 "
                         "blocks and visual.proj)")
    if tuple(visual["visual.conv1.weight"].shape) != (768, 3, 16, 16):
        raise ValueError(f"{path.name}: patch embedding {tuple(visual['visual.conv1.weight'].shape)}, FaRL ViT-B/16 "
                         "has (768, 3, 16, 16)")
    sd = comfy.clip_vision.convert_to_transformers(visual, "visual.")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(FARL_CONFIG, f)
    try:
        cv = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        Path(f.name).unlink(missing_ok=True)
    missing, _ = cv.load_sd(sd)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise ValueError(f"{path.name}: {len(missing)} tensors of ViT-B/16 are missing, e.g. {missing[:3]}")
    return cv


# -- the pool -------------------------------------------------------------------------------------------------------
POOL_FILE_HINT = "diffusion-de-id.pool.safetensors in the dataset command's keys folder"
REBUILD = "build the pool again with scripts/anonymize_dataset.py --method diffusion-de-id"


@dataclass
class Pool:
    identity: torch.Tensor      # (K, D) FaceID-space embeddings the fakes were rendered with
    appearance: torch.Tensor    # (K, A) appearance embeddings of the fakes
    latents: torch.Tensor       # (K, 4, h, w) the fakes' VAE latents
    recognizer: torch.Tensor    # (K, R) recognizer embeddings of the fakes (zeros where no face)
    has_face: torch.Tensor      # (K,) bool
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.identity.shape[0])

    def save(self, path: str | Path) -> None:
        import safetensors.torch
        tensors = {k: getattr(self, k).contiguous() for k in ("identity", "appearance", "latents", "recognizer")}
        tensors["has_face"] = self.has_face.to(torch.uint8)
        meta = {"format": POOL_FORMAT, **{k: json.dumps(v) for k, v in self.meta.items()}}
        safetensors.torch.save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Pool":
        import safetensors

        from ..guidance.weights import read_tensor_file
        name = Path(path).name
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ValueError(f"{name} is not a readable Diffusion De-ID pool file ({type(e).__name__}): {REBUILD}") \
                from None
        if meta.get("format") != POOL_FORMAT:
            raise ValueError(f"{name} is not a Diffusion De-ID pool file (format {meta.get('format')!r}): give the "
                             f"pool file the dataset command wrote ({POOL_FILE_HINT})")
        t = read_tensor_file(path, damaged=f"the pool is damaged: {REBUILD}")  # NaN / infinity refused, by tensor
        missing = [k for k in ("identity", "appearance", "latents", "recognizer", "has_face") if k not in t]
        if missing:
            raise ValueError(f"{name} lacks the pool tensor(s) {missing}: {REBUILD}")
        pool = cls(t["identity"], t["appearance"], t["latents"], t["recognizer"], t["has_face"].bool(),
                   {k: json.loads(v) for k, v in meta.items() if k != "format"})
        pool.check(name)
        return pool

    def check(self, name: str = "the pool") -> "Pool":
        """Refuse an empty pool and tensors whose counts or ranks disagree, in the user's terms."""
        dims = {"identity": 2, "appearance": 2, "latents": 4, "recognizer": 2, "has_face": 1}
        for k, d in dims.items():
            if getattr(self, k).dim() != d:
                raise ValueError(f"{name} is malformed: its '{k}' tensor has shape {tuple(getattr(self, k).shape)}, "
                                 f"expected {d} dimensions: {REBUILD}")
        counts = {k: int(getattr(self, k).shape[0]) for k in dims}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{name} is malformed: its tensors disagree on the number of fakes ({counts}): {REBUILD}")
        if counts["identity"] == 0:
            raise ValueError(f"{name} holds no fakes, so there is nothing to pair the face with: {REBUILD} (from a "
                             "folder with at least two photos in which a face is found)")
        return self


def pool_size(real_count: int, factor: float = 1.5) -> int:
    """|X_F| > |X_R|: ceil(factor * N), at least N + 1."""
    if factor <= 1.0:
        raise ValueError(f"the pool factor must exceed 1 (|X_F| > |X_R|), got {factor}")
    return max(int(math.ceil(factor * real_count)), real_count + 1)


def _largest_face(face_model, image_hwc: torch.Tensor):
    return _chosen_face(face_model, image_hwc, None)


def _chosen_face(face_model, image_hwc: torch.Tensor, face_mask: torch.Tensor | None):
    """The face of ``image_hwc`` (H, W, 3) De-ID works on: the largest ``face_mask`` (H, W) covers (a crop's own
    face: :func:`~..guidance.face.base.crop_faces`), the largest without one; None when there is none."""
    faces = crop_faces(face_model.detect(image_hwc), face_mask)
    return faces[0] if faces else None


def crop_embedding(identity_model, work: torch.Tensor, face_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The FaceID-space embedding (1, D) of a crop's face in a working image (1, H, W, 3) under ``identity_model``
    (the face ``face_mask`` covers, the largest without one), None without a face: the real embedding x_T is
    inverted under when no FACE_EMBEDDING is given (the dataset command)."""
    face = _chosen_face(identity_model, work[0], face_mask)
    if face is None:
        return None
    with torch.no_grad():
        return identity_model.embed(work.movedim(-1, 1), face.landmarks.float()[None]).float().cpu()


def build_pool(model, vae, positive, negative, adapter, face_model, appearance: Appearance, real_embeddings,
               count: int, seed: int, resolution: int = 512, steps: int = 30, cfg: float = 5.0,
               sampler: str = "ddim", scheduler: str = "ddim_uniform", identity_weight: float = 1.0,
               identity_metric: str = "cosine", identity_threshold: float = 0.68,
               progress: Progress | None = None) -> Pool:
    """Render ``count`` fakes with identities from the fixed prior (:func:`fake_identities`), each beyond the match
    threshold of every real embedding (N, D) in the identity model's space (``identity_metric``/``_threshold``)."""
    identities, check = fake_identities(count, seed, real_embeddings, identity_metric, identity_threshold)
    fakes = render_fakes(model, vae, positive, negative, adapter, face_model, appearance, identities, range(count),
                         seed, resolution, steps, cfg, sampler, scheduler, identity_weight, progress)
    return assemble_pool(identities, fakes, pool_meta(count, seed, resolution, steps, cfg, sampler, scheduler,
                                                      real_embeddings.shape[0], check, appearance.name,
                                                      getattr(face_model, "name", "?")))


def pool_meta(count: int, seed: int, resolution: int, steps: int, cfg: float, sampler: str, scheduler: str,
              real_count: int, check: dict, appearance: str, recognizer: str) -> dict:
    """What a pool records of how it was made (the fakes' prior and :func:`fake_identities`' check among it)."""
    return {"count": int(count), "seed": int(seed), "resolution": resolution, "steps": steps, "cfg": cfg,
            "sampler": sampler, "scheduler": scheduler, "prior": "uniform on the unit sphere",
            "real_count": int(real_count), **check, "appearance": appearance, "recognizer": recognizer}


def render_fakes(model, vae, positive, negative, adapter, face_model, appearance: Appearance, identities, indices,
                 seed: int, resolution: int = 512, steps: int = 30, cfg: float = 5.0, sampler: str = "ddim",
                 scheduler: str = "ddim_uniform", identity_weight: float = 1.0,
                 progress: Progress | None = None) -> list[tuple]:
    """The fakes ``indices`` of a pool: (latent, appearance embedding, recognizer embedding or None) each. Fake i
    depends only on ``identities[i]`` and its noise seed ``seed + 1 + i``, so fakes rendered apart (the dataset
    command's workers) assemble into the pool one process renders."""
    from ..guidance.sampling import sample_text_guided

    from ..guidance import identity_streams as ids
    with torch.no_grad():
        on, off = ids.identity_tokens(adapter, identities[:1])
    patched, ss = ids.apply_identity_streams(model, [ids.Stream("identity", adapter, on, off, identity_weight)])
    channels = int(getattr(patched.get_model_object("latent_format"), "latent_channels", 4))
    fakes = []
    indices = list(indices)
    for n, i in enumerate(indices):
        check_interrupt()
        with torch.no_grad():
            ss.set_tokens("identity", on=ids.identity_tokens(adapter, identities[i:i + 1])[0])
        empty = torch.zeros(1, channels, resolution // 8, resolution // 8)
        lat = sample_text_guided(patched, positive, negative, cfg, sampler, scheduler, steps, empty, int(seed) + 1 + i,
                                 preview=False)
        image = vae.decode(lat)[..., :3].float().clamp(0, 1)
        with torch.no_grad():
            app = appearance(image.movedim(-1, 1))[0][0].cpu()
            face = _largest_face(face_model, image[0])
            rec = (face_model.embed(image.movedim(-1, 1), face.landmarks.float()[None].to(image))[0].cpu()
                   if face is not None else None)
        fakes.append((lat[0].float().cpu(), app, rec))
        report(progress, n + 1, len(indices), f"fake {n + 1}/{len(indices)}")
    return fakes


def assemble_pool(identities: torch.Tensor, fakes: list[tuple], meta: dict) -> Pool:
    """A Pool from its identities and their fakes (:func:`render_fakes`, in index order)."""
    recs = [rec for _, _, rec in fakes if rec is not None]
    rec_dim = recs[0].shape[0] if recs else 1
    rec = torch.stack([r if r is not None else torch.zeros(rec_dim) for _, _, r in fakes])
    found = torch.tensor([r is not None for _, _, r in fakes])
    return Pool(identities, torch.stack([a for _, a, _ in fakes]), torch.stack([lat for lat, _, _ in fakes]), rec,
                found, {**meta, "faces_found": int(found.sum())})


# -- anonymisation ----------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One iteration of the optimisation (the curve a front end may draw: ``Step.detail["history"]``)."""
    iteration: int
    loss: float
    l_id: float
    l_att: float
    cos: float


@dataclass
class DeIDResult:
    image: torch.Tensor | None      # (1, H, W, 3): the final render at the working resolution
    embedding: torch.Tensor         # (1, D) the best embedding found
    pair: int                       # the paired fake's index in the pool
    pair_distance: float
    history: list[Record]
    best: Record
    settings: dict
    delivered: dict | None = None   # the identity check measured on the delivered render (None: not rendered)
    pool_check: dict = field(default_factory=dict)  # the pool's real-fake check (smallest distance, metric, ...)

    def info(self) -> dict:
        """The report: ``cos_start`` / ``cos`` are the optimisation's (on its ``render_steps`` stand-in render);
        ``delivered`` is the identity check on the image actually delivered (the full render, 8-bit rounded)."""
        first = self.history[0] if self.history else self.best
        out = {"pair": self.pair, "pair_distance": round(self.pair_distance, 6), "cos_start": round(first.cos, 6),
               "cos": round(self.best.cos, 6), "l_id": round(self.best.l_id, 6), "l_att": round(self.best.l_att, 6),
               "best_iteration": self.best.iteration, "delivered": self.delivered}
        if "min_real_fake_distance" in self.pool_check:
            out["min_real_fake_distance"] = round(float(self.pool_check["min_real_fake_distance"]), 6)
            out["real_fake_metric"] = self.pool_check.get("identity_metric")
            out["real_fake_threshold"] = self.pool_check.get("identity_threshold")
        return out


def render_grid(sigmas: torch.Tensor, render_steps: int) -> torch.Tensor:
    """``render_steps`` + 1 levels of the descending ``sigmas``, from the first to the last (0), evenly spaced."""
    n = len(sigmas) - 1
    idx = sorted({round(i * n / render_steps) for i in range(render_steps + 1)})
    return sigmas[torch.tensor(idx)]


class _Optimisation:
    """Inside the sampler: render x_A from x_T with an embedding, the losses, and the optimiser loop."""

    def __init__(self, settings: DeIDSettings, job: dict):
        self.s, self.job = settings, job

    def render(self, model, x_t, grid, extra_args, e):
        ss, tokens = self.job["stream_set"], self.job["tokens"]
        ss.set_tokens("identity", on=tokens(e))
        s_in = x_t.new_ones([x_t.shape[0]])
        x = x_t

        def step(x_in, i):
            check_interrupt()  # every UNet call of the differentiable render: Cancel stops within one step
            den = model(x_in, thaw(grid[i] * s_in), **extra_args)
            return ddim_step(x_in, den, grid[i], grid[i + 1])
        for i in range(len(grid) - 1):
            if self.s.checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(step, x, i, use_reentrant=False)
            else:
                x = step(x, i)
        return self.job["decode"](x)

    def losses(self, image):
        job = self.job
        lms = job["landmarks"].to(image).expand(image.shape[0], 5, 2).contiguous()
        emb = job["face_model"].embed(image, lms)
        l_id, cos = identity_loss(emb, job["id_ref"], self.s.objective)
        if self.s.lambda_att > 0:
            l_att = attribute_loss(job["appearance"](image)[1], job["patches_ref"])
        else:
            l_att = torch.zeros_like(l_id)
        return l_id + self.s.lambda_att * l_att, l_id, l_att, cos

    def run(self, model, x_t, sigmas, extra_args) -> tuple[torch.Tensor, list[Record]]:
        s, job = self.s, self.job
        grid = render_grid(sigmas, s.render_steps)
        e0 = job["e0"].detach().float()
        norm = e0.norm(dim=-1, keepdim=True)
        unit = float(norm) / math.sqrt(e0.shape[-1])
        e = thaw(e0).clone().requires_grad_(True)
        opt = torch.optim.Adam([e], lr=s.lr * unit) if s.optimizer == "adam" else None
        history, best, best_e = [], None, e0.clone()
        x_t = thaw(x_t).detach()
        for it in range(s.iterations + 1):  # the last pass only evaluates the final step's embedding
            check_interrupt()
            loss, l_id, l_att, cos = self.losses(self.render(model, x_t, grid, extra_args, e))
            check_finite(loss.detach(), f"the De-ID loss at iteration {it}")
            rec = Record(it, *(float(v.detach()) for v in (loss, l_id, l_att, cos)))
            history.append(rec)
            if best is None or rec.loss < best.loss:
                best, best_e = rec, e.detach().clone()
            report(job.get("progress"), it, s.iterations, f"iteration {it}/{s.iterations}: |cos| to the original "
                   f"{abs(rec.cos):.4f} on the gradient render", history=list(history))
            if it == s.iterations:
                break
            (grad,) = torch.autograd.grad(loss.sum(), [e])
            with torch.no_grad():
                if opt is not None:
                    e.grad = grad
                    opt.step()
                else:
                    e -= s.lr * unit * grad.sign()
                e.mul_(norm / e.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                check_finite(e, f"the embedding after iteration {it}")
        job["best_step"] = best
        return best_e, history


def _deid_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, job=None):
    """k-diffusion signature: the optimisation from x = x_T at sigmas[0]; returns x unchanged."""
    extra_args = {} if extra_args is None else extra_args
    with gradients_enabled():
        thaw_diffusion_model(model)
        job["stream_set"].thaw()
        rec = getattr(job["face_model"], "recognizer", None)
        if isinstance(rec, torch.nn.Module):
            thaw_inference_tensors(rec)
        job["out"] = _Optimisation(job["settings"], job).run(model, x, sigmas, extra_args)
    return x


def check_face_model(face_model) -> None:
    if not getattr(face_model, "differentiable", False) or getattr(face_model, "recognizer", None) is None:
        raise ValueError(f"Diffusion De-ID takes the gradient of L_id through the recognizer, and "
                         f"{getattr(face_model, 'name', face_model)} is not differentiable (dlib is for evaluation "
                         "only): use an ArcFace / FaceNet FACE_MODEL")


def pair_image(pool: Pool, appearance: Appearance, work: torch.Tensor, objective: str) -> tuple[int, float]:
    """(index, distance) of the nearest fake to a working image (1, H, W, 3)."""
    with torch.no_grad():
        app = appearance(work.movedim(-1, 1).float())[0].cpu()
    if app.shape[-1] != pool.appearance.shape[-1]:
        raise ValueError(f"the pool's fakes were described by an appearance encoder of width "
                         f"{pool.appearance.shape[-1]}, this clip_vision gives width {app.shape[-1]}: connect the "
                         "CLIP vision model the pool was built with, or build the pool with this one")
    allowed = pool.has_face if objective == "irs" else None
    idx = int(nearest_fakes(app, pool.appearance, allowed)[0])
    return idx, float((app[0].double() - pool.appearance[idx].double()).norm())


def anonymize(model, vae, conditioning, adapter, face_model, appearance: Appearance, pool: Pool,
              work: torch.Tensor, settings: DeIDSettings, *, invert: Callable | None = None, real_embedding=None,
              progress: Progress | None = None, render_final: bool = True,
              face_mask: torch.Tensor | None = None) -> DeIDResult:
    """Diffusion De-ID of one working image (1, H, W, 3) (square, the pool's resolution when ``x_t="fake"``).

    ``conditioning``: the prompt's CONDITIONING (cfg 1: inversion, render and final image all see it alone);
    ``adapter``: a FaceID adapter; ``face_model``: the differentiable recognizer of L_id with a detector;
    ``real_embedding`` (1, D): the real face's FaceID-space embedding, the condition x_T is inverted under (None: the
    adapter's "off" embedding); ``invert``: the inversion sampler (None: ``inversion.ddim.ddim_invert``);
    ``settings.gradient``: the decoder x_A's render back-propagates through (None: the full VAE; De-ID has no face
    window, the whole frame is decoded); ``face_mask`` (H, W): the face to replace (a face crop's, see
    :meth:`.contract.CropJob.face_mask`; None: the largest face found); ``progress`` receives a Step per iteration
    (``detail["history"]``: the :class:`Record` s so far).
    """
    import comfy.samplers

    from ..guidance import identity_streams as ids
    from ..guidance.guided_ddim import guided_ddim_sampler
    from ..guidance.sampling import sample_with_comfy
    from ..inversion.ddim import ddim_invert

    s, invert = settings, invert or ddim_invert
    check_face_model(face_model)
    if adapter.spec.kind != "faceid":
        raise ValueError(f"Diffusion De-ID optimises the embedding of a FaceID adapter (ip-adapter-faceid_sd15.bin); "
                         f"{adapter.name} is a {adapter.spec.kind} adapter")
    work = work[..., :3].float()
    face = _chosen_face(face_model, work[0], face_mask)
    if face is None:
        raise NoFaceError(0, f"{work.shape[2]}x{work.shape[1]} working image; De-ID replaces a detected face")
    if pool.identity.shape[-1] != adapter.spec.id_dim:
        raise ValueError(f"the pool's identities have {pool.identity.shape[-1]} numbers but {adapter.name} takes "
                         f"{adapter.spec.id_dim}-number FaceID embeddings: use the FaceID adapter the pool was built "
                         "with, or build the pool with this one")
    pair, distance = pair_image(pool, appearance, work, s.objective)
    e_fake = pool.identity[pair:pair + 1].float()
    tokens = lambda e: adapter.tokens(e.to(next(adapter.image_proj.parameters())))  # noqa: E731
    with torch.no_grad():
        start = real_embedding if (s.x_t == "real" and real_embedding is not None) else None
        on = tokens(start.float().cpu() if start is not None else e_fake)
    off = adapter.off_tokens()
    if s.x_t == "real" and real_embedding is None:
        on = off  # inversion under the "unconditional" identity
    patched, ss = ids.apply_identity_streams(model, [ids.Stream("identity", adapter, on, off, s.identity_weight)])
    decode = whole_frame_gradient_decoder(vae, patched, s.gradient, "Diffusion De-ID")  # before inverting: fail fast
    sigmas = ddim_sigmas(patched.get_model_object("model_sampling"), s.steps, 1.0)
    if s.x_t == "real":
        latent = vae.encode(work)
    else:
        latent = pool.latents[pair:pair + 1].float()
        want = (work.shape[1] // 8, work.shape[2] // 8)
        if tuple(latent.shape[-2:]) != want:
            raise ValueError(f"x_t='fake' needs the working image at the pool's resolution ({latent.shape[-1] * 8}); "
                             f"got {work.shape[2]}x{work.shape[1]}")
    x_t = sample_with_comfy(patched, invert, sigmas, conditioning, latent)
    x_r = work.movedim(-1, 1)
    with torch.no_grad():
        lms = face.landmarks.float()[None]
        id_ref = face_model.embed(x_r, lms).detach() if s.objective == "iis" else pool.recognizer[pair:pair + 1]
        patches_ref = appearance(x_r)[1].detach() if s.lambda_att > 0 else None
    job = {"stream_set": ss, "tokens": tokens, "decode": decode, "face_model": face_model,
           "appearance": appearance, "landmarks": lms, "id_ref": id_ref, "patches_ref": patches_ref, "e0": e_fake,
           "settings": s, "progress": progress}
    sampler = comfy.samplers.KSAMPLER(_deid_sampler, extra_options={"job": job})
    sample_with_comfy(patched, sampler, sigmas, conditioning, x_t)
    best_e, history = job["out"]
    result = DeIDResult(None, best_e.float().cpu(), pair, distance, history, job["best_step"],
                        {k: v for k, v in asdict(s).items() if k != "gradient"})
    result.pool_check = {k: pool.meta[k] for k in ("min_real_fake_distance", "identity_metric", "identity_threshold")
                         if k in pool.meta}
    if render_final:
        with torch.no_grad():
            ss.set_tokens("identity", on=tokens(result.embedding))
        final = sample_with_comfy(patched, guided_ddim_sampler(None), sigmas, conditioning, x_t)
        result.image = vae.decode(final)[..., :3].float().clamp(0, 1)
        result.delivered = delivered_identity(face_model, result.image, x_r, lms)
    return result


def report_text(info: dict, objective: str) -> str:
    """The node's report: the pairing, the optimisation (on its stand-in render), the identity check on the delivered
    image, and the pool's smallest real-fake distance."""
    lines = [f"paired with fake {info['pair']} (appearance distance {info['pair_distance']:.4g}); optimisation on "
             f"the short gradient render: |cos| to the original {info['cos_start']:.4f} -> {info['cos']:.4f} "
             f"({objective}, best at iteration {info['best_iteration']})"]
    d = info.get("delivered")
    if d:
        verdict = "STILL RECOGNISED" if d["recognised"] else "not recognised"
        lines.append(f"delivered image ({d['recognizer']}{'' if d['face_found'] else ', no face detected on it: '}"
                     f"{'' if d['face_found'] else 'measured at the original landmarks'}): cos {d['cos']:.4f}, "
                     f"distance {d['distance']:.4f} ({d['metric']}, threshold {d['threshold']:g}): {verdict}")
    if "min_real_fake_distance" in info:
        lines.append(f"pool: smallest real-fake identity distance {info['min_real_fake_distance']:.4f} "
                     f"({info['real_fake_metric']}, match threshold {info['real_fake_threshold']:g})")
    else:
        lines.append("pool: built before fakes were checked against the real faces (no real-fake distance on "
                     "record); rebuild it")
    return "\n".join(lines)


def delivered_identity(face_model, delivered: torch.Tensor, original: torch.Tensor, landmarks: torch.Tensor) -> dict:
    """The identity check on the delivered image (1, H, W, 3), rounded to 8 bits as it is saved, against the
    original (1, 3, H, W) with its ``landmarks`` (1, 5, 2): the face is detected on the delivered image (the
    original's landmarks when none is found, which the report says), embedded by ``face_model`` and compared under
    its metric and threshold."""
    with torch.no_grad():
        saved = (delivered.float().clamp(0, 1) * 255).round() / 255
        face = _largest_face(face_model, saved[0])
        lms = face.landmarks.float()[None].to(saved) if face is not None else landmarks.to(saved)
        emb = face_model.embed(saved.movedim(-1, 1), lms)
        ref = face_model.embed(original.float(), landmarks.to(original))
        distance = float(face_model.distance(emb, ref.to(emb))[0])
        cos = float(F.cosine_similarity(emb, ref.to(emb), dim=1)[0])
    return {"recognizer": getattr(face_model, "name", "?"), "face_found": face is not None, "cos": round(cos, 6),
            "distance": round(distance, 6), "metric": face_model.metric, "threshold": float(face_model.threshold),
            "recognised": distance < float(face_model.threshold)}


# -- behind the method contract ---------------------------------------------------------------------------------------
def appearance_of(clip_vision) -> Appearance:
    """The appearance encoder of a CLIP_VISION model (one already wrapped is taken as it is: FaRL, the dataset's)."""
    return clip_vision if isinstance(clip_vision, Appearance) else Appearance(clip_vision)


def run(crops: list[CropJob], models: Models, settings: DeIDSettings, progress: Progress | None = None) -> MethodResult:
    """The contract's run: each crop's face (the one the crop was cut around) de-identified against the pool.

    ``models``: the MODEL, VAE, CLIP_VISION (the appearance encoder the pool was paired with), the FaceID adapter and
    the differentiable FACE_MODEL of L_id; ``models.extra``: ``pool`` (:class:`Pool`), ``conditioning`` (the
    prompt's CONDITIONING) and ``real_embedding`` ((1, D) the original's FaceID-space embedding, one face's: with it
    the method protects one face at a time, :data:`ONE_FACE`) or ``identity_model`` (a FACE_MODEL in FaceID's
    embedding space: each crop's own face embedded with it, :func:`crop_embedding`; the dataset command); with
    neither, the adapter's "off" embedding. Each face's report is :meth:`DeIDResult.info` with the face's index
    (``report_text`` writes it for people)."""
    pool, conditioning = models.extra["pool"], models.extra["conditioning"]
    real, identity_model = models.extra.get("real_embedding"), models.extra.get("identity_model")
    if real is not None and len(crops) > 1:
        raise ValueError(f"one real_embedding is one face's identity, and {len(crops)} faces are chosen: choose one "
                         "face (the pipeline's faces: largest, or indices with one index)")
    appearance = appearance_of(models.clip_vision)
    faces = []
    for n, job in enumerate(crops):
        face_mask = job.face_mask() if job.crop.face_index >= 0 else None
        e_real = real
        if e_real is None and identity_model is not None:
            e_real = crop_embedding(identity_model, job.image, face_mask)
            if e_real is None:
                raise NoFaceError(job.photo, f"the identity model finds no face in the crop of face "
                                             f"{job.crop.face_index}")
        result = anonymize(models.model, models.vae, conditioning, models.adapter, models.face_model, appearance,
                           pool, job.image, settings, real_embedding=e_real, face_mask=face_mask,
                           progress=within(progress, n, len(crops), f"face {n + 1}/{len(crops)}"
                                           if len(crops) > 1 else ""))
        faces.append(FaceResult(result.image, {"face": job.crop.face_index, "objective": settings.objective,
                                               **result.info()}, key=None, parts={"embedding": result.embedding}))
    return MethodResult(faces)


METHOD = Method("Diffusion De-ID", run, DeIDSettings)
ONE_FACE = replace(METHOD, max_faces=1)  # with the original's embedding (one face's identity): one face at a time
