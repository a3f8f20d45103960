"""Anonymize a whole image folder with any method of the pack: resumable, idempotent, on one machine or Ray.

The pieces, each small:

- :data:`METHODS` maps a method name to a factory ``make(settings) -> protect(image, seed) -> Protected``;
  the factory loads its models once (a Ray actor calls it once, then protects many images).
- :class:`Manifest`: ``manifest.jsonl`` in the output folder, one line per finished image (method,
  parameters, seed, epsilon where it applies, key file, status, error). The last line for an image wins.
- :func:`plan`: the images still to do. An image is finished when its manifest line exists and, for
  status "ok", its output file too; anything else (never started, killed half-way) is done again.
- :class:`Worker`: protects one image and writes its output and key atomically (temporary file, then
  rename), so a killed run leaves either the old state or the new file, never half a file. Output and key
  names derive from the image's relative path alone, so a redone image replaces, never duplicates.
- :func:`run_local` / :func:`run_ray`: the same Worker in this process, or one actor per GPU (CPU actors
  when there is none) with Ray Data's ``map_batches``; the driver alone writes the manifest.

The pack runs headless: ComfyUI's ``comfy`` package in-process, no server. Run it through
``bash scripts/dev.sh python scripts/anonymize_dataset.py ...`` (see that file for the options).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

MANIFEST = "manifest.jsonl"
KEY_SUFFIX = ".key.safetensors"
FINAL = ("ok", "no_face", "error")


# -- methods --------------------------------------------------------------------------------------
@dataclass
class Protected:
    """One protected image: pixels (H, W, 3) in [0, 1], an optional key (tensors, metadata), extra facts."""
    image: torch.Tensor
    key: tuple[dict, dict] | None = None
    info: dict = field(default_factory=dict)


def _face_model(settings: dict):
    """The face model a method detects (and guides) with: ``face_model`` "dlib" or "<detector>/<recognizer>"."""
    spec = settings.get("face_model", "mtcnn/facenet-casia")
    if spec == "dlib":
        from diffprivacy.guidance.face.dlib_face import load_dlib_face_model
        return load_dlib_face_model(int(settings.get("detect_size", 1600)))
    from diffprivacy.guidance.face.loader import load_face_model
    detector, _, recognizer = spec.partition("/")
    return load_face_model(detector, recognizer or "facenet-casia", "auto", torch.device("cpu"))


def _baseline(method: str, default_strength: float):
    def make(settings: dict):
        from diffprivacy.evaluation.baselines import cover_faces
        face_model = _face_model({"face_model": "dlib", **settings})
        strength = float(settings.get("strength", default_strength))
        margin = float(settings.get("margin", 0.2))

        def protect(image: torch.Tensor, seed: int) -> Protected:
            out, mask = cover_faces(face_model, image[None], method, strength, margin, "all", "error", seed)
            return Protected(out[0], info={"faces_covered": bool(mask.any())})
        return protect
    return make


def _checkpoint(settings: dict):
    import comfy.sd
    path = settings.get("checkpoint")
    if not path or not Path(path).is_file():
        raise ValueError(f"this method needs an SD 1.5 checkpoint: give --checkpoint FILE (got {path!r})")
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    return model, clip, vae


def _diff_privacy_anonymize(settings: dict):
    """Diff-Privacy anonymization with a text Key-E (one prompt; learning a Key-E per image is a GPU job:
    run the learn-key-e workflow per image instead), Key-I by DDIM inversion, both in a sealed key file."""
    from diffprivacy.guidance import diff_privacy
    from diffprivacy.guidance.diff_privacy import FaceChoice
    from diffprivacy.guidance.working_image import working_image
    from diffprivacy.inversion.ddim import make_key_i
    from diffprivacy.inversion.fingerprint import clip_fingerprint, model_fingerprint
    from diffprivacy.inversion.key_bundle import LATENT_SCALE, bundle_tensors
    from diffprivacy.inversion.key_e import KeyE, encode_text
    from diffprivacy.inversion.keyfile import key_bundle_metadata

    model, clip, vae = _checkpoint(settings)
    face_model = _face_model(settings)
    steps, strength, tau = int(settings.get("steps", 50)), float(settings.get("strength", 0.6)), 0.4
    resolution = int(settings.get("resolution", 512))
    with torch.inference_mode():
        key_e = KeyE.from_texts(clip, settings.get("prompt", "a photo of a person"))
        uncond = encode_text(clip, "")
    fingerprints = {"model_fingerprint": model_fingerprint(model), "clip_fingerprint": clip_fingerprint(clip)}

    def protect(image: torch.Tensor, seed: int) -> Protected:
        with torch.inference_mode():
            work = working_image(image[None], vae, resolution)
            run = diff_privacy.anonymize(model, vae, face_model, work, key_e.schedule(uncond, tau), seed=seed,
                                         steps=steps, strength=strength, num_outputs=1,
                                         guidance_scale=float(settings.get("guidance_scale", 1.0)),
                                         faces=FaceChoice(settings.get("faces", "all")))
            key_i = make_key_i(model, key_e, vae.encode(work), steps)
        tensors = bundle_tensors(key_i, key_e.to_conditioning())
        h, w = tensors["key_i"].shape[2:]
        metadata = key_bundle_metadata(steps=steps, tau=tau, strength=strength, image_width=w * LATENT_SCALE,
                                       image_height=h * LATENT_SCALE, **fingerprints)
        return Protected(run.images[0], key=(tensors, metadata))
    return protect


def _diffusion_deid(settings: dict):
    """Diffusion De-ID (thesis ch. 6): the run's fake pool is built once from the input folder (deid_method.py)."""
    from deid_method import make
    return make(settings)


METHODS: dict[str, Callable[[dict], Callable]] = {
    "blur": _baseline("blur", 10.0),
    "pixelate": _baseline("pixelate", 6.0),
    "mosaic": _baseline("mosaic", 16.0),
    "diff-privacy-anonymize": _diff_privacy_anonymize,
    "diffusion-de-id": _diffusion_deid,
}


def check_method(name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are: {', '.join(sorted(METHODS))}")


# -- files ----------------------------------------------------------------------------------------
def list_dataset(input_dir: Path) -> list[str]:
    """Every file under ``input_dir`` (relative POSIX paths, sorted), images or not: a file that is not a
    readable image is reported in the manifest rather than silently skipped. Hidden files are left out."""
    files = []
    for folder, dirs, names in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name != MANIFEST:
                files.append((Path(folder) / name).relative_to(input_dir).as_posix())
    return files


def output_path(output_dir: Path, rel: str) -> Path:
    """The protected image's file: the same relative path, as PNG (lossless: JPEG would undo perturbations)."""
    return (output_dir / rel).with_suffix(".png")


def key_path(keys_dir: Path, rel: str) -> Path:
    return keys_dir / (rel + KEY_SUFFIX)


def image_seed(seed: int, rel: str) -> int:
    """A per-image seed from the run's seed and the image's path: the same on every rerun and every shard."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:4], "little")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_files(folder: Path) -> int:
    """Delete the temporary files a killed run left (``.<name>.<random>.part<suffix>``, see :func:`_atomic_write`):
    their images are redone. Returns how many were removed."""
    removed = 0
    for p in folder.rglob(".*.part*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def check_folders(input_dir: Path, output_dir: Path, keys_dir: Path) -> None:
    """Refuse layouts that would eat their own input or hide keys among the images."""
    input_dir, output_dir, keys_dir = (p.resolve() for p in (input_dir, output_dir, keys_dir))
    if not input_dir.is_dir():
        raise ValueError(f"the input folder {input_dir} does not exist")
    for name, folder in (("output", output_dir), ("keys", keys_dir)):
        if folder == input_dir or input_dir in folder.parents:
            raise ValueError(f"the {name} folder {folder} lies inside the input folder {input_dir}: a rerun would "
                             "take its own outputs as input. Choose a folder outside it")
    if keys_dir == output_dir or output_dir in keys_dir.parents:
        raise ValueError(f"the keys folder {keys_dir} lies inside the output folder: keys are secrets and must not "
                         "travel with the published images. Choose a separate folder")
    for folder in (output_dir, keys_dir):
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"cannot write into {folder}: {e.strerror or e}") from None


# -- manifest -------------------------------------------------------------------------------------
class Manifest:
    """``manifest.jsonl``: appended one line per finished image, flushed and synced line by line."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / MANIFEST

    def read(self) -> dict[str, dict]:
        rows = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that image is simply done again
                    continue
                if isinstance(row, dict) and "file" in row:
                    rows[row["file"]] = row
        return rows

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def plan(files: list[str], manifest: dict[str, dict], output_dir: Path, retry_errors: bool = False) -> list[str]:
    """The files still to do: not in the manifest, or "ok" there but without their output, or (when asked)
    those that ended in an error."""
    todo = []
    for rel in files:
        row = manifest.get(rel)
        if row is None or row.get("status") not in FINAL:
            todo.append(rel)
        elif row["status"] == "ok" and not output_path(output_dir, rel).exists():
            todo.append(rel)
        elif retry_errors and row["status"] == "error":
            todo.append(rel)
    return todo


# -- the worker -----------------------------------------------------------------------------------
class Worker:
    """Loads a method's models once; protects images by relative path and writes their files.

    A Ray Data callable class as it is (``__call__`` takes a batch {"file": [...]} and returns the
    manifest rows as a batch), and the single-process runner's worker.
    """

    def __init__(self, method: str, settings: dict, input_dir: str, output_dir: str, keys_dir: str, seed: int = 0,
                 password_env: str = ""):
        check_method(method)
        if settings.get("models"):
            from model_folders import use_models_folder
            use_models_folder(settings["models"])
        self.method, self.settings, self.seed = method, dict(settings), int(seed)
        self.input_dir, self.output_dir, self.keys_dir = Path(input_dir), Path(output_dir), Path(keys_dir)
        self.password = os.environ.get(password_env) if password_env else None
        self.protect = METHODS[method]({**self.settings, "_run": {"input_dir": input_dir, "keys_dir": keys_dir,
                                                                  "seed": self.seed}})  # dataset-wide methods

    def process(self, rel: str) -> dict:
        from diffprivacy.evaluation.images import load_image, save_image
        from diffprivacy.guidance.face.base import NoFaceError
        seed = image_seed(self.seed, rel)
        row = {"file": rel, "method": self.method, "parameters": self.settings, "seed": seed, "key_file": None}
        started = time.monotonic()
        try:
            image = load_image(self.input_dir / rel)
            result = self.protect(image, seed)
            if not bool(torch.isfinite(result.image).all()):
                raise ValueError("the protected image is not finite (NaN): nothing was written")
            if result.key is not None:
                from diffprivacy.inversion.keyfile import write_key_file
                tensors, metadata = result.key
                kp = key_path(self.keys_dir, rel)
                _atomic_write(kp, lambda p: write_key_file(p, tensors, metadata, self.password, overwrite=True))
                row["key_file"] = kp.relative_to(self.keys_dir).as_posix()
                row["key_sealed"] = bool(self.password)
            # the temporary name ends in .part.png: Pillow writes PNG
            _atomic_write(output_path(self.output_dir, rel), lambda p: save_image(result.image, p))
            row.update(status="ok", output=output_path(self.output_dir, rel).relative_to(self.output_dir).as_posix(),
                       **{k: v for k, v in result.info.items() if k not in row})
        except NoFaceError as e:
            row.update(status="no_face", error=str(e))
        except (ValueError, OSError) as e:  # unreadable, too small, several faces where one is needed, ...
            row.update(status="error", error=str(e))
        row["seconds"] = round(time.monotonic() - started, 3)
        return row

    def __call__(self, batch: dict) -> dict:
        rows = [self.process(str(rel)) for rel in batch["file"]]
        return {"row": [json.dumps(r, sort_keys=True) for r in rows]}


# -- runners --------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr: done/total, images per second, time left."""

    def __init__(self, total: int, out=sys.stderr):
        self.total, self.done, self.out, self.start = total, 0, out, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 60):d}:{int(left % 60):02d}" if left != float("inf") else "?"
        self.out.write(f"\r[{self.done}/{self.total}] {rate:.2f} images/s, ETA {eta}   ")
        self.out.flush()
        if self.done >= self.total:
            self.out.write("\n")


def run_local(worker_args: dict, todo: list[str], manifest: Manifest, progress: Progress | None = None) -> list:
    worker = Worker(**worker_args)
    rows = []
    for rel in todo:
        row = worker.process(rel)
        manifest.append(row)
        rows.append(row)
        if progress:
            progress.update()
    return rows


def worker_python_path() -> str:
    """PYTHONPATH for Ray's worker processes: this process's import path, with the pack importable as
    ``diffprivacy`` through build/import-root (the link scripts/dev.sh makes), whatever made it importable here."""
    import diffprivacy
    pack = Path(list(diffprivacy.__path__)[0]).resolve()
    root = pack / "build" / "import-root"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "diffprivacy").exists():
        (root / "diffprivacy").symlink_to(pack)
    return os.pathsep.join([str(root)] + [p for p in sys.path if p and Path(p).is_dir()])


def check_ray_address(address: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds, with a clear message, when a cluster address does not answer."""
    if address in ("", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"a Ray address is host:port or ray://host:port, got {address!r}") from None
    try:
        socket.create_connection((host or "127.0.0.1", port_number), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"the Ray cluster at {address} does not answer ({e.strerror or e}); start it with "
                         "`ray start --head` there, or leave --address out to run on this machine") from None


def run_ray(worker_args: dict, todo: list[str], manifest: Manifest, address: str = "", actors: int = 0,
            progress: Progress | None = None) -> list:
    """One actor per GPU (``num_gpus=1``), or ``actors`` CPU actors where there is no GPU; models load once
    per actor. Actors that die are restarted and their images retried; the driver writes the manifest."""
    import ray

    check_ray_address(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line instead
    env = {"PYTHONPATH": worker_python_path(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name in ("DIFFPRIVACY_MODELS_DIR", worker_args.get("password_env") or ""):
        if name and name in os.environ:
            env[name] = os.environ[name]
    init = {"address": address} if address not in ("", "local") else {"num_cpus": max(actors, 1) + 1}
    ray.init(runtime_env={"env_vars": env}, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, **init)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = gpus or max(actors, 1)
        ds = ray.data.from_items([{"file": rel} for rel in todo], override_num_blocks=max(len(todo), 1))
        out = ds.map_batches(Worker, fn_constructor_kwargs=worker_args, batch_size=1, concurrency=count,
                             num_gpus=1 if gpus else 0, num_cpus=1,
                             max_restarts=-1, max_task_retries=-1)
        rows = []
        for item in out.iter_rows():
            row = json.loads(item["row"])
            manifest.append(row)
            rows.append(row)
            if progress:
                progress.update()
        return rows
    finally:
        ray.shutdown()


def run(method: str, input_dir, output_dir, keys_dir, settings: dict | None = None, seed: int = 0,
        use_ray: bool | None = None, address: str = "", actors: int = 2, password_env: str = "",
        retry_errors: bool = False, progress: bool = True, log=print) -> dict:
    """Plan, run and summarise. ``use_ray`` None: Ray when it is installed (and says so when it is not)."""
    check_method(method)
    input_dir, output_dir, keys_dir = Path(input_dir), Path(output_dir), Path(keys_dir)
    check_folders(input_dir, output_dir, keys_dir)
    manifest = Manifest(output_dir)
    leftovers = remove_partial_files(output_dir) + remove_partial_files(keys_dir)
    if leftovers:
        log(f"removed {leftovers} half-written file(s) a previous run left; their images are done again")
    files = list_dataset(input_dir)
    todo = plan(files, manifest.read(), output_dir, retry_errors)
    log(f"{len(files)} file(s), {len(files) - len(todo)} already finished, {len(todo)} to do ({method})")
    if password_env and not os.environ.get(password_env):
        raise ValueError(f"the key password variable {password_env} is not set (keys are sealed with its value)")
    worker_args = dict(method=method, settings=settings or {}, input_dir=str(input_dir), output_dir=str(output_dir),
                       keys_dir=str(keys_dir), seed=seed, password_env=password_env)
    if use_ray is None:
        try:
            import ray  # noqa: F401
            use_ray = True
        except ImportError:
            log("Ray is not installed: running in this process (pip install 'ray[data]' to scale out)")
            use_ray = False
    bar = Progress(len(todo)) if progress and todo else None
    rows = [] if not todo else (run_ray(worker_args, todo, manifest, address, actors, bar) if use_ray
                                else run_local(worker_args, todo, manifest, bar))
    final = manifest.read()
    counts: dict[str, int] = {}
    for rel in files:
        status = final.get(rel, {}).get("status", "missing")
        counts[status] = counts.get(status, 0) + 1
    return {"files": len(files), "ran": len(rows), "status": counts, "ray": bool(use_ray and todo)}


__all__ = ["METHODS", "Manifest", "Protected", "Worker", "check_folders", "list_dataset", "plan", "run"]
