"""DIFP (You et al., Entropy 2024, Sec. 3.3): identity- and style-guided protection with realism control.

The face is regenerated from the original's noised latent under a donor identity and a style, with dual
classifier-free guidance (Eq. 10), three entries of ONE batched UNet call per step:

    eps = eps(z, ∅, ∅) + s_id [eps(z, I_id, ∅) - eps(z, ∅, ∅)] + s_sty [eps(z, ∅, I_sty) - eps(z, ∅, ∅)]

The conditions are the identity and style streams of :mod:`.identity_streams` (IP-Adapter-FaceID for I_id,
IP-Adapter for I_sty, on the user's SD 1.5 checkpoint: our adaptation, the paper's conditional UNet and its
encoders are not public); ∅ is a stream switched off (the projection of a zero embedding, as the adapters
were trained), selected per batch entry by the stream switches the guider sets. The text condition is one
CONDITIONING (the paper uses none: an empty prompt) shared by the three entries. Since the three predictions
enter linearly, combining the denoised estimates (what ComfyUI's guiders return) is the same as combining eps.
Core ``DualCFGGuider`` computes the same thing with neg = (∅,∅), middle = (∅,sty), pos = (id,∅),
cfg1 = s_id, cfg2 = s_id + s_sty (tests check it).

Then deterministic DDIM from S_n * T (Eq. 15; S_n <= 1: a level beyond the last timestep does not exist) with
realism control (:mod:`.ilvr`) after each step, and the result composited into the original through a
feathered mask over the detected face (only the face changes; an option regenerates the whole frame).

⚠ Gaps of the paper, as settled here: s_id, s_sty are not reported (defaults 1.0 / 1.0); k in Eq. 13 is not
reported (0); the identity/style encoders are not named (ArcFace r50 buffalo_l / CLIP-ViT-H, the adapters'
own); X_com is only "the combined reference"; I_sty is "an image of any style".

Where the style and the realism reference come from is an explicit choice (``SOURCES``: the original, another
image, none), because both can feed the original back into the protected face: the original as I_sty puts its
CLIP-vision reading (appearance, with identity cues) into every step at s_sty, and the original as X_com copies its
low frequencies at every controlled step (at g_rea 0.6, H = 26 of 64 latent cells per side: face shape, pose,
skin tone and light). "none" drops the style stream (s_sty is then 0) or the realism control.

:data:`METHOD` is DIFP behind the pack's one method contract (:mod:`.contract`): :class:`DIFPSettings` (validated
when built), :func:`run` on the face crops (one face per photo: its key is that face's), each face's key
(:class:`.difp_keys.DIFPKey`) as its key material.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..guidance.ddim import ddim_sigmas
from ..guidance.guided_ddim import guided_ddim_sampler
from ..guidance.identity_streams import COND_KEY, with_stream_switches
from ..guidance.ilvr import MODES, SPACES, RealismControl
from ..guidance.progress import Progress, report
from ..guidance.sampling import sample
from ..guidance.weights import require_finite
from .contract import FaceResult, Method, MethodResult, Models

log = logging.getLogger("diffprivacy")

ENTRY_STREAMS = {"none": (), "identity": ("identity",), "style": ("style",)}


def dual_cfg(e00: torch.Tensor, e_id: torch.Tensor, e_sty: torch.Tensor, s_id: float, s_sty: float) -> torch.Tensor:
    """Eq. 10 on predictions (eps or denoised: the combination is affine with weights summing to 1)."""
    return e00 + s_id * (e_id - e00) + s_sty * (e_sty - e00)


def active_entries(s_id: float, s_sty: float) -> list[str]:
    """The entries one step evaluates: (∅,∅) always, (id,∅) unless s_id = 0, (∅,sty) unless s_sty = 0."""
    return ["none"] + (["identity"] if s_id != 0.0 else []) + (["style"] if s_sty != 0.0 else [])


def without_stream_flags(conditioning: list) -> list:
    """A copy of a CONDITIONING without per-condition stream flags (they would override the guider's switches)."""
    out = []
    for emb, opts in conditioning:
        opts = dict(opts)
        if COND_KEY in opts.get("model_conds", {}):
            opts["model_conds"] = {k: v for k, v in opts["model_conds"].items() if k != COND_KEY}
        out.append([emb, opts])
    return out


@functools.cache
def _guider_class():
    import comfy.samplers

    class DIFPGuider(comfy.samplers.CFGGuider):
        """Eq. 10 as a native GUIDER: every active entry of a step in one ``calc_cond_batch`` call."""

        s_id = 1.0
        s_sty = 1.0
        calls = 0  # predict_noise calls (tests)

        def set_scales(self, s_id: float, s_sty: float) -> None:
            for name, v in (("s_id", s_id), ("s_sty", s_sty)):
                if not math.isfinite(float(v)):
                    raise ValueError(f"{name} is {v}; it must be a finite number")
            self.s_id, self.s_sty = float(s_id), float(s_sty)

        def set_conds(self, conditioning) -> None:
            clean = without_stream_flags(conditioning)
            self.inner_set_conds({name: clean for name in ENTRY_STREAMS})

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            import comfy.samplers as cs
            names = active_entries(self.s_id, self.s_sty)
            switches = {i: ENTRY_STREAMS[n] for i, n in enumerate(names)}
            outs = cs.calc_cond_batch(self.inner_model, [self.conds[n] for n in names], x, timestep,
                                      with_stream_switches(model_options, switches))
            self.calls += 1
            got = dict(zip(names, outs))
            e00 = got["none"]
            return dual_cfg(e00, got.get("identity", e00), got.get("style", e00), self.s_id, self.s_sty)

    return DIFPGuider


def difp_guider(model, conditioning, s_id: float, s_sty: float):
    """The DIFP GUIDER on a MODEL carrying identity/style streams (``apply_identity_streams``)."""
    guider = _guider_class()(model)
    guider.set_scales(s_id, s_sty)
    guider.set_conds(conditioning)
    return guider


# -- protection ---------------------------------------------------------------------------------------------------
def check_strength(strength: float) -> float:
    """S_n in (0, 1]. The paper's sweep includes S_n = 1.2 and 2 (t = S_n * T beyond the last timestep T)."""
    s = float(strength)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"S_n (noise strength) must lie in (0, 1], got {strength}")
    if s > 1.0:
        raise ValueError(f"S_n = {s} asks for noise level t = S_n*T = {s:g}T, beyond the last timestep T of the "
                         "diffusion model (the paper's S_n = 1.2 and 2 cannot be run as printed; its best value is "
                         "0.8). Use a value in (0, 1]; 1.0 starts from pure noise")
    return s


def feathered_box_mask(height: int, width: int, boxes: list, grow: float = 0.25, feather: float = 0.15
                       ) -> torch.Tensor:
    """(H, W) mask: 1 inside each face box grown by ``grow`` of its size on every side, ramping linearly to 0
    over ``feather`` of its size towards the grown box's edge, exactly 0 outside it."""
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
    mask = torch.zeros(height, width)
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        size = max(x1 - x0, y1 - y0, 1.0)
        x0, y0, x1, y1 = x0 - grow * size, y0 - grow * size, x1 + grow * size, y1 + grow * size
        inside = torch.minimum(torch.minimum(xs - x0, x1 - xs), torch.minimum(ys - y0, y1 - ys))
        ramp = (inside / max(feather * size, 1e-6)).clamp(0.0, 1.0)
        mask = torch.maximum(mask, ramp)
    return mask


def composite(protected: torch.Tensor, original: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """IMAGE (N, H, W, 3): the protected pixels inside ``mask`` (H, W), the original's outside."""
    if mask is None:
        return protected
    m = mask.to(protected).view(1, *mask.shape, 1)
    return protected * m + original.to(protected) * (1.0 - m)


@dataclass
class DIFPResult:
    images: torch.Tensor      # IMAGE (N, H, W, 3), composited
    generated: torch.Tensor   # IMAGE (N, H, W, 3), before compositing
    latents: torch.Tensor     # the sampled latents (VAE space)
    sigmas: torch.Tensor
    realism: RealismControl | None


def sampling_latent(model, vae_latent: torch.Tensor) -> torch.Tensor:
    """A VAE latent in the sampler's space (what the guider's sampler sees)."""
    return model.get_model_object("latent_format").process_in(vae_latent)


def realism_control(model, vae, reference_latent: torch.Tensor, settings: DIFPSettings) -> RealismControl | None:
    if not settings.realism:
        return None
    decode = encode = None
    if settings.realism_space == "pixel":
        fmt = model.get_model_object("latent_format")
        decode = lambda z: vae.decode(fmt.process_out(z))  # noqa: E731
        encode = lambda img: fmt.process_in(vae.encode(img))  # noqa: E731
    return RealismControl(sampling_latent(model, reference_latent), settings.g_rea, settings.realism_k,
                          settings.realism_mode, settings.realism_stop_at, settings.seed, settings.realism_space,
                          decode, encode)


def regenerate(model, vae, image: torch.Tensor, conditioning, settings: DIFPSettings,
               mask: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> DIFPResult:
    """Regenerate one working image (1, H, W, 3) with a MODEL carrying the identity/style streams.

    ``num_outputs`` copies of its latent are noised to S_n*T with independent seeded noise, denoised by DDIM under
    the DIFP guider with realism control towards ``reference`` (an IMAGE, default the original), decoded and
    composited into the original through ``mask`` (None: the whole frame changes).
    """
    import comfy.sample

    if settings.s_id == 0.0 and settings.s_sty == 0.0:
        log.warning("[Diff-Privacy] DIFP with s_id = s_sty = 0 is plain img2img: the face is regenerated without a "
                    "donor identity, which protects little")
    sigmas = ddim_sigmas(model.get_model_object("model_sampling"), settings.steps, settings.strength)
    z0 = vae.encode(image)
    ref_latent = z0 if reference is None else vae.encode(reference)
    realism = realism_control(model, vae, ref_latent, settings)
    batch = z0.repeat(settings.num_outputs, 1, 1, 1)
    noise = comfy.sample.prepare_noise(batch, settings.seed)
    guider = difp_guider(model, conditioning, settings.s_id, settings.s_sty)
    samples = sample(guider, guided_ddim_sampler(None, realism=realism), sigmas, batch, noise, settings.seed)
    generated = vae.decode(samples)[..., :3].float()
    if generated.shape[1:3] != image.shape[1:3]:  # VAEs crop to their grid; the working image is on it already
        generated = F.interpolate(generated.movedim(-1, 1), size=image.shape[1:3], mode="bilinear").movedim(1, -1)
    return DIFPResult(composite(generated, image[..., :3], mask), generated, samples, sigmas, realism)


# -- the donor ----------------------------------------------------------------------------------------------------
def synthetic_donor(original: torch.Tensor, face_model, seed: int = 0, margin: float = 0.1, tries: int = 1000
                    ) -> torch.Tensor:
    """A unit identity embedding (1, D) drawn at random until the recognizer's distance to ``original`` (1, D)
    exceeds its threshold by ``margin`` (so no photo of a real donor is needed)."""
    g = torch.Generator().manual_seed(int(seed))
    ref = F.normalize(original.detach().float().reshape(1, -1), dim=1)
    for _ in range(tries):
        cand = F.normalize(torch.randn(ref.shape, generator=g), dim=1)
        if float(face_model.distance(cand, ref).reshape(-1)[0]) > face_model.threshold + margin:
            return cand
    raise ValueError(f"no synthetic donor far enough from the original within {tries} draws (threshold "
                     f"{face_model.threshold}, metric {face_model.metric})")


def same_person_warning(donor: torch.Tensor, original: torch.Tensor, face_model) -> str | None:
    """A warning when the recognizer says the donor is the original's person (then DIFP protects nothing)."""
    d = float(face_model.distance(donor.float().reshape(1, -1), original.float().reshape(1, -1)).reshape(-1)[0])
    if d < face_model.threshold:
        return (f"the donor is the same person as the original for {face_model.name} (distance {d:.3f} < threshold "
                f"{face_model.threshold}): transferring this identity protects nothing. Use another donor or the "
                "synthetic donor")
    return None


# -- the whole protection of one photo ------------------------------------------------------------------------------
DONORS = ("synthetic", "image", "embedding")
SOURCES = ("original", "another image", "none")   # of the style image I_sty and of the realism reference X_com
SOURCE_COST = {
    "style": {"original": "the original's CLIP-vision appearance (with identity cues) guides every step at s_sty",
              "another image": "the other image's style; nothing of the original",
              "none": "no style stream (s_sty is 0)"},
    "reference": {"original": "the original's low frequencies (face shape, pose, skin tone, light) are copied at "
                              "every controlled step",
                  "another image": "the other image's low frequencies; nothing of the original",
                  "none": "no realism control"},
}


def check_source(what: str, source: str, image, input_name: str) -> None:
    """An explicit source choice and its image input agree (an image connected but not used is an error too)."""
    if source not in SOURCES:
        raise ValueError(f"{what} source must be one of {SOURCES}, got {source!r}")
    if source == "another image" and image is None:
        raise ValueError(f"{what} source 'another image' needs the image connected to {input_name}")
    if source != "another image" and image is not None:
        raise ValueError(f"{input_name} is connected but the {what} source is {source!r}, so it would be ignored: "
                         f"choose 'another image' to use it, or disconnect it")


def _resize_to(image: torch.Tensor, size: tuple[int, int], what: str, warnings: list) -> torch.Tensor:
    if tuple(image.shape[1:3]) == tuple(size):
        return image
    msg = f"{what} is {image.shape[2]}x{image.shape[1]}, the working image {size[1]}x{size[0]}: resized to match"
    log.info("[Diff-Privacy] %s", msg)
    warnings.append(msg)
    return F.interpolate(image[..., :3].movedim(-1, 1).float(), size=tuple(size), mode="bicubic",
                         antialias=True).clamp(0, 1).movedim(1, -1)


def _donor(face_model, original: dict, settings: DIFPSettings):
    """(donor embedding (1, D), aligned crops or None)."""
    from ..guidance.face.base import NoFaceError
    from ..guidance.identity_streams import face_identity
    if settings.donor == "synthetic":
        return synthetic_donor(original["embedding"], face_model, settings.seed), None
    if settings.donor == "embedding":
        emb = settings.donor_embedding["embedding"][:1].float()
        crops = settings.donor_embedding.get("crops_224")
        return emb, (crops[:1] if crops is not None else None)
    try:
        found = face_identity(face_model, settings.donor_image[:1])
    except NoFaceError as e:
        raise NoFaceError(None, f"in the donor image ({e}): give a photo with a visible face, or use the synthetic "
                                "donor") from e
    return found["embedding"][:1], found["crops_224"][:1]


@dataclass(frozen=True)
class DIFPSettings:
    """Everything DIFP Protect is told, validated once when built.

    ``style_source`` "none" sets ``s_sty`` to 0 and ``reference_source`` "none" turns ``realism`` off: the settings
    say what runs. The images (donor, style, realism reference) are IMAGEs; ``donor_embedding`` a FACE_EMBEDDING."""
    steps: int = 50
    strength: float = 0.8      # S_n (Eq. 15)
    s_id: float = 1.0
    s_sty: float = 1.0
    g_rea: float = 0.6         # realism scale (Eq. 13); off: realism=False
    realism: bool = True
    realism_mode: str = "fixed"
    realism_k: float = 0.0
    realism_stop_at: float = 1.0
    realism_space: str = "latent"
    seed: int = 0
    num_outputs: int = 1
    donor: str = "synthetic"                 # DONORS: synthetic | image (donor_image) | embedding (donor_embedding)
    style_source: str = "original"           # SOURCES: I_sty is the original, style_image, or no style stream
    reference_source: str = "original"       # SOURCES: X_com is the original, reference, or no realism control
    whole_frame: bool = False                # regenerate the whole crop, not only a feathered face region
    mask_grow: float = 0.25
    mask_feather: float = 0.15
    shortcut_scale: float = 1.0
    prompt: str = ""                         # the text condition (DIFP: empty), stored in the key
    donor_image: torch.Tensor | None = field(default=None, compare=False)
    donor_embedding: dict | None = field(default=None, compare=False)
    style_image: torch.Tensor | None = field(default=None, compare=False)
    reference: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        check_strength(self.strength)
        for name in ("steps", "num_outputs"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        for name in ("s_id", "s_sty", "g_rea", "realism_k", "realism_stop_at", "mask_grow", "mask_feather",
                     "shortcut_scale"):
            require_finite(getattr(self, name), name)
        if not 0.0 <= self.g_rea <= 1.0:
            raise ValueError(f"g_rea (realism scale) must lie in [0, 1], got {self.g_rea}")
        if not 0.0 <= self.realism_stop_at <= 1.0:
            raise ValueError(f"realism_stop_at must lie in [0, 1], got {self.realism_stop_at}")
        if self.realism_mode not in MODES:
            raise ValueError(f"realism mode must be one of {MODES}, got {self.realism_mode!r}")
        if self.realism_space not in SPACES:
            raise ValueError(f"realism space must be one of {SPACES}, got {self.realism_space!r}")
        if self.mask_grow < 0 or self.mask_feather < 0:
            raise ValueError(f"mask_grow and mask_feather must be >= 0, got {self.mask_grow}, {self.mask_feather}")
        if self.donor not in DONORS:
            raise ValueError(f"donor must be one of {DONORS}, got {self.donor!r}")
        if self.s_id != 0.0 and self.donor == "embedding" and (not isinstance(self.donor_embedding, dict)
                                                               or "embedding" not in self.donor_embedding):
            raise ValueError("donor = embedding needs a FACE_EMBEDDING connected to donor_embedding")
        if self.s_id != 0.0 and self.donor == "image" and self.donor_image is None:
            raise ValueError("donor = image needs the donor photo connected to donor_image")
        check_source("style", self.style_source, self.style_image, "style_image")
        check_source("realism reference", self.reference_source, self.reference, "reference")
        if self.style_source == "none":
            object.__setattr__(self, "s_sty", 0.0)
        if self.reference_source == "none":
            object.__setattr__(self, "realism", False)

    def sources(self) -> dict:
        """{"style": ..., "reference": ...}: the choices made and what each costs."""
        sources = {"style": f"{self.style_source}: {SOURCE_COST['style'][self.style_source]}",
                   "reference": f"{self.reference_source}: {SOURCE_COST['reference'][self.reference_source]}"}
        if self.s_sty == 0.0 and self.style_source != "none":
            sources["style"] = f"{self.style_source}, unused (s_sty = 0)"
        if not self.realism and self.reference_source != "none":
            sources["reference"] = f"{self.reference_source}, unused (realism off)"
        return sources


@dataclass
class DIFPProtection:
    result: DIFPResult
    original_identity: dict   # face_identity of the original (embedding, landmarks, model)
    donor_embedding: torch.Tensor | None
    mask: torch.Tensor | None
    warnings: list


def protect_crop(models: Models, image: torch.Tensor, conditioning, settings: DIFPSettings,
                 face_mask: torch.Tensor | None = None) -> DIFPProtection:
    """DIFP on one working image (a face crop): find the face, choose the donor, add the streams, regenerate,
    composite. ``models``: the checkpoint's MODEL (no streams) and VAE, the FACE_MODEL, the identity adapter
    (``adapter``), ``clip_vision`` and ``extra["style_adapter"]``. ``face_mask`` (R, R): the face the crop was cut
    around (its identity is replaced and its box composited, not a larger neighbour's in the same crop); None: the
    largest face."""
    from ..guidance.face.base import NoFaceError, crop_faces
    from ..guidance.identity_streams import (Stream, apply_identity_streams, face_identity, identity_tokens,
                                             recognizer_space_warning, style_tokens)
    face_model, warnings = models.face_model, []
    try:
        original = face_identity(face_model, image[:1], mask=face_mask)
    except NoFaceError as e:
        raise NoFaceError(None, f"in the original ({e}): DIFP protects a face; give a photo with a visible face") from e
    streams, donor = [], None
    if settings.s_id != 0.0:
        space = recognizer_space_warning(face_model.name)
        if space:
            warnings.append(space)
            log.warning("[Diff-Privacy] %s", space)
        donor, crops = _donor(face_model, original, settings)
        same = same_person_warning(donor, original["embedding"], face_model)
        if same:
            warnings.append(same)
            log.warning("[Diff-Privacy] %s", same)
        on, off = identity_tokens(models.adapter, donor, models.clip_vision, crops, settings.shortcut_scale)
        streams.append(Stream("identity", models.adapter, on, off))
    if settings.s_sty != 0.0:
        style_adapter = models.extra.get("style_adapter")
        style = image if settings.style_source == "original" else _resize_to(
            settings.style_image[:1], image.shape[1:3], "the style image", warnings)
        on, off = style_tokens(style_adapter, models.clip_vision, style)
        streams.append(Stream("style", style_adapter, on, off))
    if settings.s_id == 0.0 and settings.s_sty == 0.0:
        warnings.append("s_id = s_sty = 0: plain img2img (no donor identity, no style): this protects little")
    streamed = apply_identity_streams(models.model, streams)[0] if streams else models.model
    reference = None if settings.reference_source != "another image" else _resize_to(
        settings.reference[:1], image.shape[1:3], "the realism reference", warnings)
    mask = None
    if not settings.whole_frame:
        largest = crop_faces(face_model.detect(image[0]), face_mask)[0]  # found above: face_identity raised otherwise
        mask = feathered_box_mask(image.shape[1], image.shape[2], [largest.box], settings.mask_grow,
                                  settings.mask_feather)
    result = regenerate(streamed, models.vae, image, conditioning, settings, mask, reference)
    return DIFPProtection(result, original, donor, mask, warnings)


def check_models(models: Models, settings: DIFPSettings) -> None:
    """The models DIFP needs for these settings are connected, and the MODEL carries no streams of its own (the
    contract calls it before any photo is run)."""
    from ..guidance.identity_streams import carried_streams
    carried = carried_streams(models.model)
    if carried is not None:
        raise ValueError(f"the `model` input already carries {'/'.join(sorted(carried.streams))} stream(s) (from Apply "
                         f"Identity Streams): DIFP Protect adds its identity and style streams itself, as chosen by "
                         f"donor and style_source, and a stream from upstream would mix in whatever it was built "
                         f"from. Connect the checkpoint's MODEL directly.")
    if settings.s_id != 0.0 and models.adapter is None:
        raise ValueError("s_id > 0 needs an identity adapter (ip-adapter-faceid_sd15.bin, or a DIFP-trained one); "
                         "set s_id 0 to run without a donor identity")
    if settings.s_sty != 0.0 and (models.extra.get("style_adapter") is None or models.clip_vision is None):
        raise ValueError("s_sty > 0 needs a style adapter (ip-adapter_sd15 / -plus) and CLIP vision (ViT-H); set "
                         "s_sty 0 to run without a style")


def run(crops: list, models: Models, settings: DIFPSettings, progress: Progress | None = None) -> MethodResult:
    """The contract's run: each crop regenerated under a donor identity and a style, and its key (F_i + F_e of the
    crop: :class:`.difp_keys.DIFPKey`, without ``face_crops``: the caller records where the crop was cut)."""
    from .difp_keys import make_difp_key
    conditioning = models.clip.encode_from_tokens_scheduled(models.clip.tokenize(settings.prompt))
    sources, faces = settings.sources(), []
    for n, job in enumerate(crops):
        report(progress, n, len(crops), f"face {n + 1}/{len(crops)}")
        done = protect_crop(models, job.image, conditioning, settings,
                            job.face_mask() if job.crop.face_index >= 0 else None)
        found = done.original_identity
        key = make_difp_key(models.model, conditioning, models.vae.encode(job.image), settings.steps,
                            settings.strength, found["embedding"][:1], found["landmarks"][:1], models.face_model.name)
        faces.append(FaceResult(done.result.images,
                                {"face": job.crop.face_index, "outputs": int(done.result.images.shape[0]),
                                 "style": sources["style"], "reference": sources["reference"],
                                 "warnings": list(done.warnings)},
                                key=key, parts={"latents": {"samples": done.result.latents},
                                                "sigmas": done.result.sigmas, "mask": done.mask}))
    report(progress, len(crops), len(crops), "done")
    return MethodResult(faces)


METHOD = Method("DIFP", run, DIFPSettings, max_faces=1, check_models=check_models)
