"""Diffusion De-ID as a dataset-command method (``--method diffusion-de-id``): models, the run's fake pool, one image.

The pool and the pairing need the whole dataset: the factory builds the pool once per run from the input folder and
stores it in the keys folder as ``diffusion-de-id.pool.safetensors`` (no real image is in it, but it was drawn from
the real set's identity statistics: it stays private with the keys). With Ray, the first actor builds it under a file
lock and the others read it; a rerun reuses it, so reruns pair exactly as the first run did.

Settings (``--set name=value``; the maths and the defaults are in ``guidance/diffusion_deid.py``):

=================  ==================================================================================================
adapter            FaceID file (path, or a name in models/ipadapter/), default ``ip-adapter-faceid_sd15.bin``
clip_vision        appearance encoder (path, or a name in models/clip_vision/), default ``clip-vit-large-patch14``
farl               a FaRL ViT-B/16 checkpoint: appearance from FaRL instead of CLIP-vision (the thesis's encoder)
face_model         the differentiable recognizer of L_id, ``detector/recognizer`` (default ``mtcnn/facenet-casia``;
                   the thesis used ArcFace: ``scrfd/arcface-r50``)
identity_model     the face model whose embeddings drive FaceID (default ``scrfd/arcface-r50``, buffalo_l's)
prompt, negative   text of the fakes and of every render (negative: the fakes' CFG only)
resolution         working size (square), default 512
pool, pool_factor  a pool file to use instead of building one; |X_F| = ceil(pool_factor * faces), default 1.5
pool_steps, cfg    the fakes' DDIM steps and CFG (30, 5.0)
objective, x_t, optimizer, lr, iterations, lambda_att, steps, render_steps, identity_weight, checkpoint
                   the optimisation (:class:`DeIDSettings`)
=================  ==================================================================================================
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import torch

POOL_NAME = "diffusion-de-id.pool.safetensors"


def _file(value: str | None, default: str, folder: str) -> Path:
    name = value or default
    if Path(name).is_file():
        return Path(name)
    import folder_paths
    found = folder_paths.get_full_path(folder, name)
    if not found:
        raise ValueError(f"{name} was found neither as a file nor in models/{folder}/ (--models sets the folder)")
    return Path(found)


def _face_model(spec: str):
    from diffprivacy.guidance.face.loader import load_face_model
    detector, _, recognizer = spec.partition("/")
    return load_face_model(detector, recognizer or "facenet-casia", "auto", torch.device("cpu"))


def load_models(settings: dict) -> dict:
    import comfy.clip_vision
    import comfy.sd
    from diffprivacy.guidance import diffusion_deid as deid
    from diffprivacy.guidance import ip_adapter as ipa

    path = settings.get("checkpoint")
    if not path or not Path(path).is_file():
        raise ValueError(f"diffusion-de-id needs an SD 1.5 checkpoint: give --checkpoint FILE (got {path!r})")
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        ipa.register_model_folder()
        adapter = ipa.load_adapter(_file(settings.get("adapter"), "ip-adapter-faceid_sd15.bin", "ipadapter"))
        if settings.get("farl"):
            appearance = deid.Appearance(deid.load_farl(settings["farl"]), "FaRL ViT-B/16")
        else:
            cv = comfy.clip_vision.load(str(_file(settings.get("clip_vision"), "clip-vit-large-patch14.safetensors",
                                                  "clip_vision")))
            appearance = deid.Appearance(cv)

        def encode(text):
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))
        positive = encode(settings.get("prompt", "a photo of a person's face, high quality"))
        negative = encode(settings.get("negative", "blurry, deformed, cartoon, text"))
    loss_spec = settings.get("face_model", "mtcnn/facenet-casia")
    id_spec = settings.get("identity_model", "scrfd/arcface-r50")
    face_model = _face_model(loss_spec)
    identity_model = face_model if id_spec == loss_spec else _face_model(id_spec)
    return {"model": model, "vae": vae, "adapter": adapter, "appearance": appearance, "positive": positive,
            "negative": negative, "face_model": face_model, "identity_model": identity_model}


def real_embedding(identity_model, work: torch.Tensor) -> torch.Tensor | None:
    """The largest face's FaceID-space embedding (1, D) of a working image (1, H, W, 3), None without a face."""
    faces = identity_model.detect(work[0])
    if not faces:
        return None
    face = max(faces, key=lambda f: f.area)
    with torch.no_grad():
        return identity_model.embed(work.movedim(-1, 1), face.landmarks.float()[None]).float().cpu()


def real_embeddings(m: dict, input_dir: Path, resolution: int, log=print) -> torch.Tensor:
    from dataset_runner import list_dataset
    from diffprivacy.evaluation.images import load_image
    from diffprivacy.guidance.working_image import working_image
    rows = []
    for rel in list_dataset(input_dir):
        try:
            with torch.inference_mode():
                work = working_image(load_image(input_dir / rel)[None], m["vae"], resolution)
                e = real_embedding(m["identity_model"], work)
        except ValueError:
            continue  # unreadable or too small: its manifest line will say so
        if e is not None:
            rows.append(e[0])
    if len(rows) < 2:
        raise ValueError(f"the pool is fitted to the real set's identity embeddings: found faces in {len(rows)} "
                         f"image(s) of {input_dir}; at least 2 are needed")
    log(f"Diffusion De-ID: {len(rows)} real face(s) embedded for the pool's Gaussian")
    return torch.stack(rows)


def pool_for_run(m: dict, settings: dict, run: dict, log=print):
    """The run's pool: the file named by ``pool``, or the keys folder's, built once (under a lock) when absent."""
    from diffprivacy.guidance import diffusion_deid as deid
    resolution = int(settings.get("resolution", 512))
    if settings.get("pool"):
        pool = deid.Pool.load(settings["pool"])
    else:
        keys = Path(run["keys_dir"])
        keys.mkdir(parents=True, exist_ok=True)
        path = keys / POOL_NAME
        with open(keys / (POOL_NAME + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one actor builds, the others wait and read
            if not path.exists():
                reals = real_embeddings(m, Path(run["input_dir"]), resolution, log)
                count = deid.pool_size(len(reals), float(settings.get("pool_factor", 1.5)))
                log(f"Diffusion De-ID: rendering {count} fakes (|X_F| > |X_R| = {len(reals)})")
                with torch.inference_mode():
                    pool = deid.build_pool(m["model"], m["vae"], m["positive"], m["negative"], m["adapter"],
                                           m["face_model"], m["appearance"], reals, count, int(run.get("seed", 0)),
                                           resolution, int(settings.get("pool_steps", 30)),
                                           float(settings.get("cfg", 5.0)))
                tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
                pool.save(tmp)
                os.replace(tmp, path)
            pool = deid.Pool.load(path)
    if pool.meta.get("resolution") != resolution:
        raise ValueError(f"the pool was rendered at {pool.meta.get('resolution')}² but resolution is {resolution}: "
                         "use the same resolution, or remove the pool file to build a new one")
    return pool


def make(settings: dict):
    """The dataset command's factory: ``protect(image (H, W, 3), seed) -> Protected``."""
    import torch.nn.functional as F

    from dataset_runner import Protected
    from diffprivacy.guidance import diffusion_deid as deid
    from diffprivacy.guidance.face.base import NoFaceError
    from diffprivacy.guidance.working_image import working_image
    from diffprivacy.inversion.ddim import ddim_invert

    run = settings.get("_run") or {}
    params = deid.DeIDSettings.from_strings(settings)
    m = load_models(settings)
    deid.check_face_model(m["face_model"])
    pool = pool_for_run(m, settings, run)
    resolution = int(pool.meta["resolution"])

    def protect(image: torch.Tensor, seed: int) -> Protected:
        with torch.inference_mode():
            work = working_image(image[None], m["vae"], resolution)
            e_real = real_embedding(m["identity_model"], work)
            if e_real is None:
                raise NoFaceError(0, "the identity model found no face")
            result = deid.anonymize(m["model"], m["vae"], m["positive"], m["adapter"], m["face_model"],
                                    m["appearance"], pool, work, params, invert=ddim_invert, real_embedding=e_real)
        out = F.interpolate(result.image.movedim(-1, 1), size=tuple(image.shape[:2]), mode="bicubic",
                            antialias=True, align_corners=False).clamp(0, 1).movedim(1, -1)[0]
        return Protected(out, info={**result.info(), "pool_size": len(pool)})
    return protect
