"""Diffusion De-ID as a dataset-command method (``--method diffusion-de-id``): models, the run's fake pool, one image.

Each photo goes through the face pipeline (:func:`.contract.protect`): every chosen face (``faces``) is cut square
around its box (``crop_factor``; ``mode=whole frame``: the photo letterboxed), de-identified at ``resolution``
(:data:`.diffusion_deid.METHOD`, what the node runs; each crop's real embedding is its own face's under
``identity_model``) and pasted back into the photo at its own size.

The pool and the pairing need the whole dataset. The pool is built once per run, in parallel by the workers: they
embed the real faces (one job per image: each chosen face in its crop, as it will be protected) and render the fakes
(one job per fake: fake i depends only on its identity and its seed, so the pool is the same whoever renders it); the
driver draws the identities (each checked against every real face), assembles the pool and writes it into the keys
folder as ``diffusion-de-id.pool.safetensors`` under a temporary name of the run, renamed into place when complete:
the file's presence is the completion marker (no file lock; one run per folder holds the folder's lock). No real
image is in the pool, but its fakes were checked against the real faces: it stays private with the keys. A rerun
reuses it, so reruns pair as the first run did.

Settings (``--set name=value``; the maths and the defaults are in ``methods/diffusion_deid.py``):

=================  ==================================================================================================
adapter            FaceID file (path, or a name in models/ipadapter/), default ``ip-adapter-faceid_sd15.bin``
clip_vision        appearance encoder (path, or a name in models/clip_vision/), default ``clip-vit-large-patch14``
farl               a FaRL ViT-B/16 checkpoint: appearance from FaRL instead of CLIP-vision (the thesis's encoder)
face_model         the differentiable recognizer of L_id, ``detector/recognizer`` (default ``mtcnn/facenet-casia``;
                   the thesis used ArcFace: ``scrfd/arcface-r50``)
identity_model     the face model whose embeddings drive FaceID (default ``scrfd/arcface-r50``, buffalo_l's)
prompt, negative   text of the fakes and of every render (negative: the fakes' CFG only)
resolution         working size of each face crop (square), default 512
mode, crop_factor, feather, mask_grow, faces
                   the face pipeline (:data:`.dataset.PIPELINE`): face crops (default) or whole frame, a crop's side
                   in face-box sides (3.0), the pasted mask's fade (5 px) and growth (1.3), all faces or the largest
pool, pool_factor  a pool file to use instead of building one; |X_F| = ceil(pool_factor * faces), default 1.5
pool_steps, cfg    the fakes' DDIM steps and CFG (30, 5.0)
objective, x_t, optimizer, lr, iterations, lambda_att, steps, render_steps, identity_weight
                   the optimisation (:class:`DeIDSettings`); ``grad_checkpoint`` its ``checkpoint`` (recompute each
                   render step in the backward pass; ``checkpoint`` is the SD checkpoint file here)
=================  ==================================================================================================
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import torch

from . import contract
from . import diffusion_deid as deid
from .dataset import (FACE_SPEC, Failed, Job, Protected, Setting, load_checkpoint, load_face_model, pick_device,
                      pipeline_options, temp_name)

POOL_NAME = "diffusion-de-id.pool.safetensors"

SETTINGS = {
    "adapter": Setting(str, "ip-adapter-faceid_sd15.bin", help="IP-Adapter-FaceID file or name in models/ipadapter"),
    "clip_vision": Setting(str, "clip-vit-large-patch14.safetensors", help="file or name in models/clip_vision"),
    "farl": Setting("file", "", help="a FaRL ViT-B/16 checkpoint"),
    "identity_model": Setting(str, "scrfd/arcface-r50", help=FACE_SPEC.help),
    "prompt": Setting(str, "a photo of a person's face, high quality"),
    "negative": Setting(str, "blurry, deformed, cartoon, text"),
    "pool": Setting("file", "", help="a pool file to use instead of building one"),
    "pool_factor": Setting(float, 1.5, 1.0, 100.0, low_open=True, help="|X_F| = ceil(pool_factor * faces)"),
    "pool_steps": Setting(int, 30, 1, 1000, help="the fakes' DDIM steps"),
    "cfg": Setting(float, 5.0, 0.0, 100.0, low_open=True, help="the fakes' CFG"),
    "objective": Setting(str, "iis", choices=deid.OBJECTIVES),
    "x_t": Setting(str, "real", choices=deid.X_T_SOURCES),
    "optimizer": Setting(str, "adam", choices=deid.OPTIMIZERS),
    "lr": Setting(float, 0.1, 0.0, 100.0, low_open=True, help="in units of an embedding component"),
    "iterations": Setting(int, 30, 0, 100000),
    "lambda_att": Setting(float, 1.0, 0.0, 1000.0),
    "steps": Setting(int, 50, 1, 1000, help="DDIM steps of the inversion and the render"),
    "render_steps": Setting(int, 4, 1, 1000, help="DDIM steps of the differentiable render, <= steps"),
    "identity_weight": Setting(float, 1.0, 0.0, 10.0, low_open=True, help="the identity stream's weight"),
    "grad_checkpoint": Setting(bool, True, help="recompute each render step in the backward pass"),
}


def params(settings: dict) -> deid.DeIDSettings:
    names = ("objective", "x_t", "optimizer", "lr", "iterations", "lambda_att", "steps", "render_steps",
             "identity_weight")
    return deid.DeIDSettings(**{n: settings[n] for n in names}, checkpoint=settings["grad_checkpoint"])


def check_settings(settings: dict) -> None:
    """Rules across settings, checked before anything starts."""
    if settings["resolution"] % 8:
        raise ValueError(f"setting resolution={settings['resolution']} must be a multiple of 8 (the VAE's factor)")
    params(settings)
    pipeline_options("diffusion-de-id", settings)


def _file(value: str | None, default: str, folder: str) -> Path:
    name = value or default
    if Path(name).is_file():
        return Path(name)
    import folder_paths
    found = folder_paths.get_full_path(folder, name)
    if not found:
        raise ValueError(f"{name} was found neither as a file nor in models/{folder}/ (--models sets the folder)")
    return Path(found)


def load_models(settings: dict) -> dict:
    import comfy.clip_vision

    from ..guidance import ip_adapter as ipa

    model, clip, vae = load_checkpoint(settings)
    with torch.inference_mode():
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
        positive, negative = encode(settings["prompt"]), encode(settings["negative"])
    face_model = load_face_model(settings["face_model"])
    identity_model = (face_model if settings["identity_model"] == settings["face_model"]
                      else load_face_model(settings["identity_model"]))
    return {"model": model, "vae": vae, "adapter": adapter, "appearance": appearance, "positive": positive,
            "negative": negative, "face_model": face_model, "identity_model": identity_model}


class DeIDWorker:
    """One worker's Diffusion De-ID: the models load once; the stages the driver calls are :meth:`embed` and
    :meth:`render_fake` (building the pool), :meth:`use_pool` (broadcast), then :meth:`protect` per image. Both
    :meth:`embed` and :meth:`protect` work on the face pipeline's crops of the photo (the same plan)."""

    def __init__(self, settings: dict):
        pick_device()
        self.settings, self.params = settings, params(settings)
        self.options = pipeline_options("diffusion-de-id", settings)
        self.m = load_models(settings)
        deid.check_face_model(self.m["face_model"])
        self.guided_by = self.m["face_model"]
        self.resolution, self.pool = settings["resolution"], None

    def _crops(self, image: torch.Tensor) -> list:
        """The crop jobs of a photo (H, W, 3) as the pipeline cuts it; raises NoFaceError without a chosen face."""
        planned = contract.plan_batch(image[None], deid.METHOD, self.m["face_model"], self.options, self.resolution)
        if planned.failures:
            raise planned.failures[0][2]
        _, photo, plan = planned.plans[0]
        return [contract.CropJob(cut, crop, 0, n) for n, (cut, crop) in enumerate(zip(plan.cut(photo), plan.crops))]

    def embed(self, rel: str, data: bytes, max_pixels: int) -> dict | None:
        """The identity embeddings (k, D) of a real image's chosen faces, each in its crop, with the identity model's
        metric and match threshold (what every fake is checked against), None when it has no face or cannot be read
        (its own manifest line says why when it is processed)."""
        from ..guidance.image_files import decode_image
        try:
            with torch.inference_mode():
                jobs = self._crops(decode_image(data, PurePosixPath(rel).name, max_pixels))
                found = [deid.crop_embedding(self.m["identity_model"], j.image, j.face_mask() if j.crop.face_index >= 0
                                             else None) for j in jobs]
        except Exception:  # noqa: BLE001  reported on the image's own line
            return None
        found = [e for e in found if e is not None]
        im = self.m["identity_model"]
        return None if not found else {"embeddings": torch.cat(found), "metric": im.metric,
                                       "threshold": float(im.threshold)}

    def render_fake(self, identities: torch.Tensor, index: int, seed: int) -> dict:
        s, m = self.settings, self.m
        with torch.inference_mode():
            fake = deid.render_fakes(m["model"], m["vae"], m["positive"], m["negative"], m["adapter"], m["face_model"],
                                     m["appearance"], identities, [index], seed, self.resolution, s["pool_steps"],
                                     s["cfg"], identity_weight=s["identity_weight"])[0]
        return {"fake": fake, "appearance": m["appearance"].name, "recognizer": getattr(m["face_model"], "name", "?")}

    def use_pool(self, pool: deid.Pool) -> None:
        self.pool = pool

    def protect(self, image: torch.Tensor, seed: int) -> Protected:
        m = self.m
        models = contract.Models(model=m["model"], vae=m["vae"], face_model=m["face_model"], adapter=m["adapter"],
                                 clip_vision=m["appearance"],
                                 extra={"identity_model": m["identity_model"], "conditioning": m["positive"],
                                        "pool": self.pool})
        with torch.inference_mode():
            delivered = contract.protect(image[None], deid.METHOD, models, self.params, self.options, self.resolution,
                                         receipt=False).delivered[0]  # the Worker measures the receipt
        faces = [f.report for f in delivered.result.faces]
        return Protected(delivered.images[0], plan=delivered.plan,
                         info={"faces_protected": len(faces), "pair": [f["pair"] for f in faces], "faces": faces,
                               "pool_size": len(self.pool)})


def build_pool(settings: dict, run, pool, log) -> deid.Pool:
    """The pool, its jobs spread over the workers: embeddings of the real images, then one fake per job."""
    embeddings: dict[str, torch.Tensor] = {}
    space: dict[str, object] = {}
    max_pixels = pool.worker.max_pixels

    def embedded(job, value) -> None:
        if value is not None and not isinstance(value, Failed):
            embeddings[job.key] = value["embeddings"]
            space.update(metric=value["metric"], threshold=value["threshold"])
    pool.map([Job(rel, "embed", lambda rel=rel: (rel, run.read(rel), max_pixels)) for rel in run.files], embedded)
    reals = torch.cat([embeddings[rel] for rel in sorted(embeddings)]) if embeddings else torch.zeros(0)
    if len(reals) < 2:
        raise ValueError(f"every fake is checked against the real set's identity embeddings: found {len(reals)} "
                         f"face(s) in {len(embeddings)} image(s) of the input folder; at least 2 faces are needed")
    count = deid.pool_size(len(reals), settings["pool_factor"])
    log(f"Diffusion De-ID: {len(reals)} real face(s) embedded; rendering {count} fakes (|X_F| > |X_R|)")
    identities, check = deid.fake_identities(count, run.seed, reals, space["metric"], space["threshold"])
    log(f"Diffusion De-ID: smallest real-fake identity distance {check['min_real_fake_distance']:.4f} "
        f"({check['identity_metric']}, match threshold {check['identity_threshold']:g}; "
        f"{check['redrawn']} draw(s) within it were redrawn)")
    fakes: dict[int, dict] = {}

    def rendered(job, value) -> None:
        if isinstance(value, Failed):
            raise ValueError(f"rendering fake {job.key} of the pool failed: {value.error}")
        fakes[job.key] = value
    pool.map([Job(i, "render_fake", lambda i=i: (identities, i, run.seed)) for i in range(count)], rendered)
    meta = deid.pool_meta(count, run.seed, settings["resolution"], settings["pool_steps"], settings["cfg"], "ddim",
                          "ddim_uniform", len(reals), check, fakes[0]["appearance"], fakes[0]["recognizer"])
    return deid.assemble_pool(identities, [fakes[i]["fake"] for i in range(count)], meta)


def prepare(settings: dict, run, pool, log) -> None:
    """The run's pool to every worker: the file ``pool`` names, or the keys folder's, built once when absent."""
    if settings.get("pool"):
        built = deid.Pool.load(settings["pool"])
    else:
        path = Path(run.keys_dir) / POOL_NAME
        if path.exists():
            built = deid.Pool.load(path)
            log(f"Diffusion De-ID: using the pool {path} ({len(built)} fakes)")
        else:
            built = build_pool(settings, run, pool, log)
            tmp = temp_name(path, run.run_id)
            built.save(tmp)
            os.replace(tmp, path)  # complete: the name appears only now
    if built.meta.get("resolution") != settings["resolution"]:
        raise ValueError(f"the pool was rendered at {built.meta.get('resolution')}² but resolution is "
                         f"{settings['resolution']}: use the same resolution, or move the pool file away to build a "
                         "new one")
    pool.broadcast("use_pool", built)
