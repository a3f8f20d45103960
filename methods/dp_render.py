"""Rendering a DP-Image identity release through the identity stream (FaceID) on the user's SD 1.5 checkpoint.

Two renderings, labelled by :func:`guidance.dp_identity.release_label` wherever the image goes:

* ``strict``: an image generated from fresh latent noise (the render seed), a fixed prompt and the identity stream
  of the noised embedding. :func:`render` never reads the original photo in this mode (it is not even passed on),
  so the image is post-processing of the noised embedding and the DP statement holds for it, *provided nothing else
  that went in carries the original*. Strict mode therefore takes only what it can vouch for: the checkpoint's MODEL
  and CLIP as loaded (no streams, attention or block patches, wrappers, LoRAs: :func:`model_additions`), and text,
  which it encodes itself; a connected CONDITIONING (it can hold image tokens, an unCLIP or style-model embedding,
  hooks) is refused by name. The label is computed from the record of what went in (:func:`inputs_provenance`,
  :func:`guidance.dp_identity.release_label`), never from the mode alone.
* ``in the photo``: the face region of the photo (a detected box, or a MASK) inpainted with the noised identity.
  Pose, background and everything outside the embedding come from the original: NOT differentially private.

The thesis's iterated form (T rounds) re-embeds each round's render and noises it again
(:func:`guidance.dp_identity.iterate`); :func:`render_release` runs it and renders the final round.

The photo mode is :data:`IN_PHOTO` behind the pack's one method contract (:mod:`.contract`): the face crop (or a
crop around a MASK's region) is rendered and pasted back into the photo at its own size. Strict mode reads no photo,
so it is :func:`render_release` alone. Both take one :class:`RenderSettings`, validated once when built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..guidance import dp_identity as dpi
from ..guidance import identity_streams as streams
from ..guidance.progress import Progress, within
from ..guidance.progress import report as step
from ..guidance.weights import require_finite
from ..guidance.working_image import cut_square, photo_mask
from .contract import CropJob, FaceResult, Method, MethodResult, Models

FACE_MARGIN = 0.25  # the inpainted region: the detected face box grown by this fraction of its size on every side


def face_box_mask(face_model, images: torch.Tensor, margin: float = FACE_MARGIN) -> torch.Tensor:
    """(B, H, W) masks, 1 over the largest detected face's box grown by ``margin`` (NoFaceError when none)."""
    from ..guidance.face.base import choose_faces
    masks = torch.zeros(images.shape[:3])
    h, w = images.shape[1:3]
    for b, img in enumerate(images):
        with torch.no_grad():
            face = choose_faces(face_model.detect(img), "largest", 0, batch_index=b)[0]
        x1, y1, x2, y2 = (float(v) for v in face.box)
        mx, my = margin * (x2 - x1), margin * (y2 - y1)
        x1, y1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
        x2, y2 = min(w, int(round(x2 + mx))), min(h, int(round(y2 + my)))
        masks[b, y1:y2, x1:x2] = 1.0
    return masks


# -- what went in ---------------------------------------------------------------------------------------------------
def _non_empty(d) -> bool:
    return bool(d) and any(bool(v) for v in (d.values() if isinstance(d, dict) else d))


def model_additions(model) -> list[str]:
    """What a ModelPatcher (MODEL, or a CLIP's patcher) carries beyond its checkpoint as loaded, each named.

    A checkpoint loader's MODEL carries nothing: no weight patches (LoRAs), object patches, model options, attention
    or block patches, wrappers, callbacks or hooks. Anything here was added upstream and may carry the original.
    """
    found = []
    streams_on = streams.carried_streams(model) if hasattr(model, "model_options") else None
    if streams_on is not None:
        found.append(f"Diff-Privacy {'/'.join(sorted(streams_on.streams))} stream(s) (from Apply Identity Streams "
                     f"or a protect node; a stream built from the original carries it)")
    options = dict(getattr(model, "model_options", {}) or {})
    transformer = dict(options.pop("transformer_options", {}) or {})
    for name, per_block in (transformer.pop("patches_replace", {}) or {}).items():
        foreign = [k for k, p in per_block.items() if not isinstance(p, streams.LayerPatch)]
        if foreign:
            found.append(f"{name} replacement patches on {len(foreign)} layer(s) (another node's attention patch)")
    for name, patches in (transformer.pop("patches", {}) or {}).items():
        if patches:
            found.append(f"{len(patches)} '{name}' patch(es) (another node's attention or block patch)")
    found += [f"transformer option '{k}'" for k, v in transformer.items() if v]
    found += [f"model option '{k}'" for k, v in options.items() if v]
    weights = getattr(model, "patches", {}) or {}
    if weights:
        marked = len(streams.faceid_lora_entries(model))
        found.append(f"weight patches on {len(weights)} weight(s) (a LoRA or merged weights"
                     + (f"; {marked} from a FaceID LoRA" if marked else "") + "; one trained on the original "
                     "carries it)")
    wrappers = {k: v for k, v in (getattr(model, "wrappers", {}) or {}).items()
                if _non_empty({k1: w for k1, w in v.items() if k1 != streams.WRAPPER_KEY})}
    if wrappers:
        found.append(f"wrappers ({', '.join(sorted(map(str, wrappers)))})")
    for attr, what in (("object_patches", "object patches"), ("callbacks", "callbacks"),
                       ("hook_patches", "hook patches"), ("attachments", "attachments"),
                       ("additional_models", "additional models"), ("injections", "injections"),
                       ("weight_wrapper_patches", "weight wrappers")):
        value = getattr(model, attr, None)
        if isinstance(value, dict) and _non_empty(value):
            found.append(f"{what} ({', '.join(sorted(map(str, value)))})")
    return found


def clip_additions(clip) -> list[str]:
    """What a CLIP carries beyond the checkpoint's text encoder as loaded (a LoRA on it, hooks, ...)."""
    patcher = getattr(clip, "patcher", None)
    return model_additions(patcher) if patcher is not None else ["no patcher: not a checkpoint's CLIP"]


def inputs_provenance(model, clip, mode: str, prompt: str, negative_prompt: str, conditioning_connected: bool) -> dict:
    """The record of what goes into a render, from which its label is computed (``dp_identity.release_label``)."""
    return {"photo_read": mode == dpi.IN_PHOTO, "model": model_additions(model),
            "clip": clip_additions(clip) if not conditioning_connected else [],
            "conditioning": "connected" if conditioning_connected else "built",
            "prompt": None if conditioning_connected else prompt,
            "negative_prompt": None if conditioning_connected else negative_prompt}


def check_strict_inputs(model, clip, prompt: str, negative_prompt: str, positive=None, negative=None) -> None:
    """Refuse, naming the input, anything but what strict mode can vouch for (see the module doc)."""
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is not None:
            raise ValueError(f"strict DP rendering builds its own conditioning from the prompt text with `clip`, so "
                             f"that nothing but the text reaches the image; the `{name}` CONDITIONING was not built "
                             f"here (a CONDITIONING can hold image tokens, an unCLIP or style-model embedding or "
                             f"hooks made from the original). Disconnect `{name}` and write the text in `prompt` / "
                             f"`negative_prompt`, or switch mode to 'in the photo' (NOT differentially private).")
    for name, what in (("model", model_additions(model)), ("clip", clip_additions(clip))):
        if what:
            raise ValueError(f"strict DP rendering needs the checkpoint's {name.upper()} as loaded, but the `{name}` "
                             f"input carries: {'; '.join(what)}. Any of these may carry the original besides the "
                             f"noised embedding. Connect Load Checkpoint's {name.upper()} directly (DP Render adds the "
                             f"noised identity stream itself), or switch mode to 'in the photo' (NOT DP).")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise ValueError(f"`{name}` must be text; got {type(text).__name__}")
        if "embedding:" in text.lower():
            raise ValueError(f"`{name}` names a textual-inversion embedding ('embedding:...'): one trained on the "
                             f"original carries it. Strict DP rendering takes plain text only.")


def encode_prompt(clip, text: str):
    """A CONDITIONING from text, as CLIP Text Encode builds it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# -- rendering -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderSettings:
    """DP Render's settings, validated once when built. What goes in besides them (MODEL, CLIP, a connected
    CONDITIONING, the prompt's words) is checked where it is used, :func:`render_release`: the label is computed from
    it. ``mask`` (in the photo only; strict reads nothing of the photo): the region to render, (H, W) or (B, H, W) at
    the photo's size; None: the detected face's box grown by :data:`FACE_MARGIN`."""
    mode: str
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    identity_weight: float = 1.0
    denoise: float = 1.0
    mask: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.mode not in dpi.RENDER_MODES:
            raise ValueError(f"render mode must be one of {dpi.RENDER_MODES}; got {self.mode!r}")
        if self.mode == dpi.STRICT and self.mask is not None:
            raise ValueError("strict rendering reads nothing of the photo: it takes no mask")
        if self.mode == dpi.STRICT and (self.width % 8 or self.height % 8 or self.width < 64 or self.height < 64):
            raise ValueError(f"width and height must be multiples of 8, at least 64; got {self.width} x {self.height}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        for name in ("cfg", "identity_weight", "denoise"):
            require_finite(getattr(self, name), name)
        if not 0.0 <= self.denoise <= 1.0:
            raise ValueError(f"denoise must be in [0, 1], got {self.denoise}")


def render(model, vae, positive, negative, adapter, embedding: torch.Tensor, settings: RenderSettings, seed: int,
           image: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, H, W, 3) of the N (noised) embeddings through the identity stream.

    ``strict``: from an empty ``width`` x ``height`` latent and noise from ``seed``; ``image`` / ``mask`` are
    ignored and never touched. ``in the photo``: ``image`` (N or 1 images) encoded, the ``mask`` region (N, H, W)
    re-noised to ``denoise`` and sampled with the identity stream.
    """
    from ..guidance.sampling import sample_text_guided

    s = settings
    if adapter.spec.kind != "faceid":
        raise ValueError(f"{adapter.name} is a {adapter.spec.kind} adapter; a DP identity release renders with the "
                         f"plain FaceID adapter (ip-adapter-faceid_sd15.bin), which reads only the embedding. FaceID "
                         f"Plus also reads the original face crop through CLIP, which the noise does not protect.")
    n = embedding.shape[0]
    on, off = streams.identity_tokens(adapter, embedding.float())
    sigmas = streams.sigma_range(model, 0.0, 1.0)
    patched, _ = streams.apply_identity_streams(
        model, [streams.Stream("identity", adapter, on, off, s.identity_weight, None, *sigmas)])
    noise_mask, denoise = None, s.denoise
    if s.mode == dpi.STRICT:
        latent = torch.zeros(n, 4, s.height // 8, s.width // 8)
        denoise = 1.0
    else:
        if image is None or mask is None:
            raise ValueError("'in the photo' rendering needs the photo and the face region (a MASK or a face model)")
        if image.shape[0] not in (1, n):
            raise ValueError(f"{image.shape[0]} photos for {n} embeddings: give one photo, or one per embedding")
        pixels = image[..., :3].expand(n, -1, -1, -1) if image.shape[0] == 1 else image[..., :3]
        hh, ww = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
        if hh < 64 or ww < 64:
            raise ValueError(f"the photo is too small ({pixels.shape[2]} x {pixels.shape[1]}); at least 64 x 64")
        pixels = pixels[:, :hh, :ww]
        latent = vae.encode(pixels)
        m = mask.float()
        m = m.expand(n, -1, -1) if m.shape[0] == 1 else m
        noise_mask = m[:, :hh, :ww].reshape(n, 1, hh, ww)
    samples = sample_text_guided(patched, positive, negative, s.cfg, s.sampler_name, s.scheduler, s.steps, latent,
                                 seed, denoise=denoise, noise_mask=noise_mask)
    return vae.decode(samples)[..., :3].float().cpu()


def render_release(models: Models, settings: RenderSettings, image: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, progress: Progress | None = None) -> tuple[torch.Tensor, dict]:
    """The final image of a release (``models.extra["release"]``: the FACE_EMBEDDING a DP Identity node made) and its
    label: strict from fresh noise (``image`` and ``mask`` must be None: the photo is never handed on), in the photo
    the face region ``mask`` (N, H, W) of ``image`` (N or 1, H, W, 3) rendered (None: the face ``models.face_model``
    finds, its box grown by :data:`FACE_MARGIN`).

    The conditioning is encoded here from ``settings.prompt`` / ``negative_prompt`` with ``models.clip``;
    ``models.extra["positive"]`` / ``["negative"]`` (a connected CONDITIONING) are taken only in the photo mode and
    refused in strict mode, as is a MODEL or CLIP that carries anything beyond the checkpoint
    (:func:`check_strict_inputs`). The label is computed from the record of what went in (:func:`inputs_provenance`).

    T = 1: render round 1's noised embedding. T > 1 (the thesis's Alg. 6): rounds 2..T render the previous round,
    re-embed the rendered face with ``models.face_model`` (a render without a face stops with the no-face error,
    naming the round) and noise it again with the release's C, σ and noise seed; the last round is rendered; the label
    then holds each round's cosine to round 1. ``progress`` receives a Step per round.
    """
    s = settings
    noised = models.extra.get("release")
    positive, negative = models.extra.get("positive"), models.extra.get("negative")
    model, vae, clip, adapter, face_model = models.model, models.vae, models.clip, models.adapter, models.face_model
    prompt, negative_prompt, mode = s.prompt, s.negative_prompt, s.mode
    release = noised.get("dp") if isinstance(noised, dict) else None
    if release is None:
        raise ValueError("this FACE_EMBEDDING is not a DP release: pass the face embedding through DP Identity "
                         "first (rendering the original embedding would publish the identity itself)")
    report = release["report"]
    rounds = int(report["rounds"])
    if mode == dpi.STRICT:
        if image is not None or mask is not None:
            raise ValueError("strict rendering reads nothing of the photo: no image or mask is handed to it")
        check_strict_inputs(model, clip, prompt, negative_prompt, positive, negative)
    connected = positive is not None or negative is not None
    if connected and (positive is None or negative is None):
        raise ValueError("connect both `positive` and `negative`, or neither (then the prompt text is encoded)")
    if clip is None and not connected:
        raise ValueError("connect `clip` (the checkpoint's CLIP): the prompt text is encoded with it")
    provenance = inputs_provenance(model, clip, mode, prompt, negative_prompt, connected)
    if not connected:
        positive, negative = encode_prompt(clip, prompt), encode_prompt(clip, negative_prompt)
    kw = dict(model=model, vae=vae, positive=positive, negative=negative, adapter=adapter, settings=s)
    if mode == dpi.IN_PHOTO:
        if image is None:
            raise ValueError("'in the photo' rendering needs the photo: connect image")
        if mask is None:
            if face_model is None:
                raise ValueError("'in the photo' rendering needs the face region: connect a face_model (its "
                                 "detector finds the face) or a mask")
            mask = face_box_mask(face_model, image)
    state = {"image": image}

    def draw(z, t):
        # strict: image=None, the photo is never handed to the renderer
        photo = state["image"] if mode == dpi.IN_PHOTO else None
        out = render(embedding=z, seed=int(s.seed) + t - 1, image=photo, mask=mask if photo is not None else None,
                     **kw)
        if mode == dpi.IN_PHOTO:
            state["image"] = out
        return out

    def embed(images, t):
        from ..guidance.face.base import NoFaceError
        try:
            return streams.face_identity(face_model, images, "largest", 0)["embedding"]
        except NoFaceError as e:
            raise ValueError(f"round {t} of {rounds}: no face in the image rendered from round {t}'s noised "
                             f"embedding, so it cannot be re-embedded ({e}). Lower sigma, raise the identity weight, "
                             f"use a face-centred prompt, or use T = 1.") from None

    z = noised["embedding"]
    trace = [1.0]
    if rounds > 1:
        if face_model is None:
            raise ValueError(f"T = {rounds} rounds re-embed each round's render: connect a face_model (the one that "
                             f"made the embedding: arcface-r50 of buffalo_l for FaceID)")
        z, trace = dpi.iterate(z, rounds, report["clip_radius"], report["sigma"], release["noise_seed"], draw, embed,
                               report["renormalize"], progress)
    images = draw(z, rounds)  # z_t is rendered with seed + t - 1
    step(progress, rounds, rounds, "rendered")
    label = dpi.release_label(report, mode, provenance)
    if rounds > 1:
        label["rounds_cosine_to_round_1"] = [round(c, 4) for c in trace]
    return images, label


# -- in the photo, behind the method contract ---------------------------------------------------------------------
def crop_mask(mask: torch.Tensor | None, job: CropJob) -> torch.Tensor | None:
    """The part of photo ``job.photo``'s MASK (at the photo's size) that ``job``'s crop holds, (1, R, R); None for
    none."""
    m = photo_mask(mask, job.photo)
    if m is None:
        return None
    c = job.crop
    return cut_square(m[None, :, :, None], c.x, c.y, c.side, job.resolution)[..., 0]


def run(crops: list[CropJob], models: Models, settings: RenderSettings, progress: Progress | None = None
        ) -> MethodResult:
    """The contract's run of the photo mode (NOT differentially private): each crop's face region (``settings.mask``
    cut to the crop, or the face the crop holds) rendered with the release, :func:`render_release`. Each face's
    report holds its label (``report["label"]``). Strict mode renders from noise and reads no photo: it is
    :func:`render_release` without one, not a method on photos."""
    if settings.mode != dpi.IN_PHOTO:
        raise ValueError(f"only 'in the photo' rendering works on a photo's face crops; {settings.mode} rendering "
                         "reads no photo")
    faces = []
    for n, job in enumerate(crops):
        images, label = render_release(models, settings, job.image, crop_mask(settings.mask, job),
                                       within(progress, n, len(crops), f"face {n + 1}/{len(crops)}"
                                              if len(crops) > 1 else ""))
        faces.append(FaceResult(images, {"face": job.crop.face_index, "label": label}))
    return MethodResult(faces)


IN_PHOTO = Method("DP render in the photo", run, RenderSettings, max_faces=1)  # one released identity
