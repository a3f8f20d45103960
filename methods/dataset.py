"""Anonymize a whole image folder with a method of the pack: resumable, idempotent, safe, on one machine or Ray.

The pieces, each small:

- :class:`Method`: a factory ``make(settings) -> protect(image, seed) -> Protected`` (models load once per
  worker) and the :class:`Setting` of each value it takes; ``--set`` values are checked against them before
  anything starts (type, finite, range, choices), naming the setting; values that would make a method do nothing
  are outside the ranges. ``dataset_methods.METHODS`` holds the diffusion methods; the command line adds the
  baselines (they live in ``evaluation/``, which ``methods/`` does not import).
- :class:`Manifest`: ``manifest.jsonl`` in the output folder. A ``run`` line per run (its id, host, pid) comes
  before any file that run writes; per image a ``writing`` line (the names about to be written) and a final line
  (method, parameters, seed, output and key names, status ``ok`` / ``no_face`` / ``error`` and why). The last
  line for an image wins.
- Ownership: the command replaces or deletes only what the manifest proves it wrote: its temporary files are
  ``.<name>.dp-<run id>.tmp`` (a run id of this manifest), its outputs the names its lines record. A file it did
  not write is never replaced: the output goes beside it (``name~2.png``), and the line says so. Two inputs that
  would share an output name (``a.jpg``, ``a.png``) each get their own, chosen deterministically and recorded.
- :class:`FolderLock`: one run per output (and keys) folder: ``O_CREAT | O_EXCL`` on a lock file holding the run
  id, host and pid (atomic on local file systems and on NFS v3+). A lock whose process is gone (same host, pid not
  running) is taken over with a message; any other lock is refused naming its holder and the file to delete if no
  run is going on.
- Inputs: every entry under ``--input`` gets exactly one manifest line. Only regular files are opened (a named
  pipe or device is an ``error`` line, never a hang), at most ``max_file_mb``; the pixel count is checked on the
  header before decoding. Symlinked folders are followed; a link back to a folder already listed (a loop, or the
  same folder twice) is an ``error`` line. Names that are not UTF-8 work as they are.
- :class:`Worker`: decodes, protects, encodes the PNG; any exception becomes the image's line. It writes no file:
  the driver (this process) writes every output and key, so a cluster needs no shared output folder.
- :class:`LocalPool` / :class:`RayPool`: the same Worker in this process, or Ray actors (one per GPU, or
  ``actors`` CPU actors). An actor that dies (a crash, a killed node) is replaced and its image retried, at most
  ``retries`` times, then that image is an ``error`` line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import stat
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from .pipeline import DEFAULT_CROP_FACTOR, DEFAULT_FEATHER, DEFAULT_MASK_GROW, MODES, PipelineOptions

MANIFEST = "manifest.jsonl"
LOCK = ".diffprivacy-dataset.lock"
KEY_SUFFIX = ".key.safetensors"
FINAL = ("ok", "no_face", "error")
MAX_FILE_MB = 256.0
MAX_MEGAPIXELS = 100.0  # a 12000 x 8000 photo; Pillow's own bomb bound is 89
RETRIES = 2
_TEMP = re.compile(r"^\..+\.dp-([0-9a-f]{12})\.tmp$")


def _log_default(message: str) -> None:
    print(message, file=sys.stderr)


# -- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One ``--set`` value: its type (int, float, str, bool, "file", "folder"), default, range and choices."""
    kind: object
    default: object = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low end itself is refused
    choices: tuple = ()
    help: str = ""

    def parse(self, method: str, name: str, raw):
        def bad(why: str):
            return ValueError(f"{method}: setting {name}={raw!r} {why}" + (f" ({self.help})" if self.help else ""))
        if self.kind is bool:
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise bad("is not true/false")
        if self.kind in (int, float):
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise bad("is not a number") from None
            if not math.isfinite(value):
                raise bad("must be a finite number")
            if self.kind is int:
                if value != int(value):
                    raise bad("must be a whole number")
                value = int(value)
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise bad(f"must be {'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None and value > self.high:
                raise bad(f"must be <= {self.high:g}")
        else:
            value = str(raw).strip()
            if self.kind in ("file", "folder") and value:
                path = Path(value).expanduser()
                if not (path.is_file() if self.kind == "file" else path.is_dir()):
                    raise bad(f"is not an existing {self.kind}")
                value = str(path.resolve())
        if self.choices and value not in self.choices:
            raise bad(f"must be one of {', '.join(map(str, self.choices))}")
        return value


FACE_SPEC = Setting(str, "mtcnn/facenet-casia", help="dlib, or detector/recognizer: detectors "
                    "mtcnn, scrfd, retinaface, dlib; recognizers facenet-casia, facenet-vggface2, arcface-r50, "
                    "arcface-r100, arcface-ir-se50")


def check_face_spec(method: str, name: str, spec: str) -> None:
    from ..guidance.face.loader import DETECTORS, RECOGNIZERS
    detector, _, recognizer = spec.partition("/")
    if spec != "dlib" and (detector not in DETECTORS or recognizer not in RECOGNIZERS):
        raise ValueError(f"{method}: setting {name}={spec!r} is not a face model ({FACE_SPEC.help})")


COMMON = {
    "checkpoint": Setting("file", "", help="the SD 1.5 checkpoint (--checkpoint)"),
    "models": Setting("folder", "", help="a ComfyUI models folder (--models)"),
    "detect_size": Setting(int, 1600, 64, 16384, help="dlib's detection size in pixels"),
    "face_model": FACE_SPEC,
    "receipt": Setting(bool, True, help="measure each output's receipt (dlib finds the faces of the original and "
                                         "judges each on the delivered 8-bit image) into its manifest line"),
}


# The face pipeline of the diffusion methods (methods/pipeline.py, as on the nodes): detect, choose, crop, protect at
# the working resolution, paste back into the photo at its own size.
PIPELINE = {
    "mode": Setting(str, MODES[0], choices=MODES, help="face crops: each chosen face cut square around its box, "
                    "protected at the working resolution and pasted back into the photo at its own size; whole frame: "
                    "the photo letterboxed to one square (padded, never squashed), for photos that are portraits"),
    "crop_factor": Setting(float, DEFAULT_CROP_FACTOR, 1.0, 10.0, help="a face crop's side in face-box sides "
                           f"(FaceDetailer's default {DEFAULT_CROP_FACTOR:g})"),
    "feather": Setting(int, DEFAULT_FEATHER, 0, 256, help="pixels over which the pasted mask fades in"),
    "mask_grow": Setting(float, DEFAULT_MASK_GROW, 1.0, 10.0, help="the pasted mask: the face box grown by this "
                         "factor, at most crop_factor"),
    "faces": Setting(str, "all", choices=("all", "largest"), help="which detected faces are protected"),
}


def pipeline_options(method: str, settings: dict) -> PipelineOptions:
    """The face pipeline's options from a diffusion method's typed settings (:data:`PIPELINE`), validated: the rules
    across them (mask_grow <= crop_factor) are refused naming the method, before anything starts."""
    try:
        return PipelineOptions(mode=settings["mode"], crop_factor=float(settings["crop_factor"]),
                               feather=int(settings["feather"]), mask_grow=float(settings["mask_grow"]),
                               faces=settings["faces"]).validated()
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None


@dataclass(frozen=True)
class Method:
    """A dataset method: ``factory(settings) -> protect(image (H, W, 3), seed) -> Protected`` (or an object with
    ``protect`` and further stages), its settings, and optionally ``prepare(settings, run, pool, log)``: work over
    the whole dataset before the images (Diffusion De-ID's pool), broadcast to the workers."""
    name: str
    factory: Callable
    settings: dict
    diffusion: bool = False
    prepare: Callable | None = None
    check: Callable | None = None  # check(typed settings): cross-setting rules, ValueError

    def validate(self, given: dict) -> dict:
        """The typed settings: defaults filled in, each given value checked, unknown names refused."""
        given = {k: v for k, v in (given or {}).items() if not k.startswith("_")}
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            raise ValueError(f"{self.name} has no setting {', '.join(map(repr, unknown))}; its settings are: "
                             f"{', '.join(sorted(self.settings))}")
        out = {}
        for name, spec in self.settings.items():
            if name in given and given[name] not in (None, ""):
                out[name] = spec.parse(self.name, name, given[name])
            elif spec.default not in (None, ""):
                out[name] = spec.default
        for name in ("face_model", "identity_model"):
            if name in out:
                check_face_spec(self.name, name, out[name])
        if self.diffusion:
            check_checkpoint(out.get("checkpoint"))
        if self.check is not None:
            self.check(out)
        return out


def check_checkpoint(path) -> None:
    """An SD checkpoint must exist and be one: a .safetensors file whose header names UNet weights
    (``model.diffusion_model.*``), or a torch zip file; checked before any model loads."""
    if not path:
        raise ValueError("this method needs an SD 1.5 checkpoint: give --checkpoint FILE")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix.lower() == ".safetensors":
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
                if not isinstance(header, dict) or not any(k.startswith("model.diffusion_model.") for k in header):
                    raise ValueError(f"--checkpoint {path} is not an SD checkpoint (no model.diffusion_model.* "
                                     "weights in its header)")
            elif not head.startswith(b"PK"):
                raise ValueError(f"--checkpoint {path} is neither a .safetensors checkpoint nor a torch checkpoint")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--checkpoint {path} cannot be read as a checkpoint: {e}") from None


def pick_device(log=_log_default) -> str:
    """The device the diffusion methods run on: the GPU when there is one, else the CPU (ComfyUI told so before it
    loads, rather than stopping with "Found no NVIDIA driver"), with a warning on the time it takes."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    log("no GPU found: the diffusion method runs on the CPU; expect minutes per image at 512x512 "
        "(--set resolution and steps trade quality for time)")
    return "cpu"


# -- methods --------------------------------------------------------------------------------------
@dataclass
class Protected:
    """One protected image: pixels (H, W, 3) in [0, 1] at the photo's size, an optional key (tensors, metadata),
    extra facts, and the face pipeline's plan (:class:`.pipeline.Plan`) when the method cut the photo: the receipt
    then measures the faces it protected, with their crop sizes (without one: every face dlib finds)."""
    image: torch.Tensor
    key: tuple[dict, dict] | None = None
    info: dict = field(default_factory=dict)
    plan: object = None


def load_face_model(spec: str, detect_size: int = 1600):
    """A face model from a spec: "dlib" or "<detector>/<recognizer>"."""
    if spec == "dlib":
        from ..guidance.face.dlib_face import load_dlib_face_model
        return load_dlib_face_model(int(detect_size))
    from ..guidance.face.loader import load_face_model as load
    detector, _, recognizer = spec.partition("/")
    return load(detector, recognizer, "auto", torch.device("cpu"))


def use_models(settings: dict) -> None:
    if settings.get("models"):
        from ..guidance.weights import use_models_folder
        use_models_folder(settings["models"])


def load_checkpoint(settings: dict):
    import comfy.sd
    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(settings["checkpoint"], output_vae=True, output_clip=True)[:3]


def resolve_method(method, methods: dict | None = None) -> Method:
    """A :class:`Method` as it is, or a name in ``methods`` (the command's registry:
    :data:`..methods.dataset_methods.METHODS` and the baselines the command line adds)."""
    if isinstance(method, Method):
        return method
    registry = methods or {}
    if method not in registry:
        raise ValueError(f"unknown method {method!r}; the methods are: {', '.join(sorted(registry))}")
    return registry[method]


# -- files ----------------------------------------------------------------------------------------
def scan_input(input_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Every entry under ``input_dir`` (relative POSIX paths, sorted), images or not, and the entries that are
    problems without being opened (a folder link that would list a folder twice, an unreadable folder).
    Hidden names are left out. Symlinked folders are followed; a folder is listed once."""
    files: list[str] = []
    problems: dict[str, str] = {}
    listed: dict[tuple[int, int], str] = {}

    def walk(folder: Path, prefix: str, ancestors: tuple) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            rel = prefix.rstrip("/") or "."
            files.append(rel)
            problems[rel] = f"cannot list the folder: {e.strerror or e}"
            return
        for entry in entries:
            if entry.name.startswith(".") or (not prefix and entry.name == MANIFEST):
                continue
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(rel)
                continue
            st = os.stat(entry.path)
            ident = (st.st_dev, st.st_ino)
            if ident in listed:
                files.append(rel)
                problems[rel] = (f"a link back to {listed[ident] or 'the input folder'} (a loop): not followed"
                                 if ident in ancestors else
                                 f"a link to the folder {listed[ident]}, listed already: not followed twice")
                continue
            listed[ident] = rel
            walk(Path(entry.path), rel + "/", ancestors + (ident,))

    root = os.stat(input_dir)
    listed[(root.st_dev, root.st_ino)] = ""
    walk(Path(input_dir), "", ((root.st_dev, root.st_ino),))
    return sorted(files), problems


def list_dataset(input_dir: Path) -> list[str]:
    """The entries of :func:`scan_input` (each gets one manifest line)."""
    return scan_input(Path(input_dir))[0]


def natural_output(rel: str) -> str:
    """The output name an input would have alone: the same relative path, as PNG (lossless)."""
    return str(PurePosixPath(rel).with_suffix(".png")) if PurePosixPath(rel).suffix else rel + ".png"


def image_seed(seed: int, rel: str) -> int:
    """A per-image seed from the run's seed and the image's path: the same on every rerun and every shard (the
    path's bytes as the file system has them: names that are not UTF-8 work too)."""
    return int.from_bytes(hashlib.sha256(b"%d:" % seed + os.fsencode(rel)).digest()[:4], "little")


def read_input(path: Path, name: str, max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes``. Anything else (a named pipe, a device, a socket, a folder)
    is refused before it is read: opened non-blocking, checked on the open descriptor."""
    kinds = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
             stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ValueError(f"cannot open {name}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name} is {kinds.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not an image "
                             "file: not read")
        if st.st_size > max_bytes:
            raise ValueError(f"{name} is {st.st_size / 2**20:.0f} MiB, over the bound of {max_bytes / 2**20:.0f} "
                             "MiB (--max-file-mb)")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"{name} grew past the bound of {max_bytes / 2**20:.0f} MiB while it was read")
        return b"".join(chunks)
    except OSError as e:
        raise ValueError(f"cannot read {name}: {e.strerror or e}") from None
    finally:
        os.close(fd)


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
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write into {folder}: {e.strerror or e}") from None


def temp_name(path: Path, run_id: str) -> Path:
    """This run's temporary name for ``path``: hidden, and carrying the run id the manifest records."""
    return path.with_name(f".{path.name}.dp-{run_id}.tmp")


def write_file(path: Path, data: bytes, run_id: str, mode: int = 0o644) -> None:
    """``data`` into a temporary file of this run, synced, then renamed onto ``path``: a kill leaves the old state
    or the new file, and at worst a temporary file the next run proves its own and removes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, run_id)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_own_temp_files(folder: Path, run_ids: set[str]) -> int:
    """Delete the temporary files killed runs of this manifest left (``.<name>.dp-<run id>.tmp`` with one of
    ``run_ids``), nothing else. Returns how many."""
    removed = 0
    if not run_ids or not folder.is_dir():
        return 0
    for here, dirs, names in os.walk(folder):
        for name in names:
            m = _TEMP.match(name)
            path = Path(here) / name
            if m and m.group(1) in run_ids and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


# -- the lock -------------------------------------------------------------------------------------
class FolderLock:
    """One run per folder: ``LOCK`` created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFS v3+),
    holding the run id, host, pid and start time. A lock left by a process that no longer runs on this host is
    stale: it is moved aside (and checked to be the one judged stale) and taken. A lock from another host, or a
    live process, is refused, naming its holder and the file to delete when no run is going on."""

    def __init__(self, folder: Path, run_id: str, log=_log_default):
        self.path, self.run_id, self.log, self.held = Path(folder) / LOCK, run_id, log, False

    def _holder(self) -> dict:
        return self._holder_of(self.path)

    @staticmethod
    def _holder_of(path: Path) -> dict:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def acquire(self) -> None:
        me = {"run": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    who = (f"run {holder.get('run')} on {holder.get('host')}, pid {holder.get('pid')}, started "
                           f"{holder.get('started')}" if holder else "a run whose lock cannot be read")
                    raise ValueError(f"another run is working in {self.path.parent} ({who}): one run per folder at "
                                     f"a time. Wait for it to finish; if no run is going on (its machine crashed), "
                                     f"delete {self.path} and start again") from None
                aside = self.path.with_name(f"{LOCK}.stale-{self.run_id}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue  # another run took it over first: try again, and meet its lock
                if self._holder_of(aside) != holder:  # moved a newer lock: restore
                    os.rename(aside, self.path)
                    continue
                aside.unlink()
                self.log(f"took over the lock of run {holder.get('run')} (pid {holder.get('pid')} on this host no "
                         "longer runs)")
                continue
            except OSError as e:
                raise ValueError(f"cannot write into {self.path.parent}: {e.strerror or e}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise ValueError(f"could not take the lock {self.path}: other runs keep taking it; try again")

    def release(self) -> None:
        if self.held and self._holder().get("run") == self.run_id:
            self.path.unlink(missing_ok=True)
        self.held = False


# -- manifest -------------------------------------------------------------------------------------
class Manifest:
    """``manifest.jsonl``: appended line by line, each flushed and synced."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / MANIFEST

    def lines(self) -> list[dict]:
        out = []
        if self.path.exists():
            for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that image is simply done again
                    continue
                if isinstance(row, dict):
                    out.append(row)
        return out

    def read(self) -> dict[str, dict]:
        """The last line of each file."""
        return {row["file"]: row for row in self.lines() if isinstance(row.get("file"), str)}

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="ascii") as f:  # json escapes every non-ASCII character
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")  # a method's odd fact never stops a run
            f.flush()
            os.fsync(f.fileno())


@dataclass
class History:
    """What a manifest proves: each file's last line, this folder's run ids, and every name the runs wrote (or
    announced they were about to write) in the output and keys folders."""
    rows: dict[str, dict]
    run_ids: set[str]
    outputs: dict[str, str]   # output name -> the input it belongs to
    keys: dict[str, str]      # key file name -> the input it belongs to

    @classmethod
    def of(cls, manifest: Manifest) -> "History":
        rows, run_ids, outputs, keys = {}, set(), {}, {}
        for row in manifest.lines():
            if isinstance(row.get("run"), str) and row.get("event") == "start":
                run_ids.add(row["run"])
            rel = row.get("file")
            if not isinstance(rel, str):
                continue
            rows[rel] = row
            if isinstance(row.get("output"), str):
                outputs[row["output"]] = rel
            if isinstance(row.get("key_file"), str):
                keys[row["key_file"]] = rel
        return cls(rows, run_ids, outputs, keys)


def plan(files: list[str], rows: dict[str, dict], output_dir: Path, retry_errors: bool = False) -> list[str]:
    """The files still to do: not in the manifest, or "ok" there but without their output, or (when asked)
    those that ended in an error."""
    todo = []
    for rel in files:
        row = rows.get(rel)
        if row is None or row.get("status") not in FINAL:
            todo.append(rel)
        elif row["status"] == "ok" and not (output_dir / str(row.get("output") or natural_output(rel))).exists():
            todo.append(rel)
        elif retry_errors and row["status"] == "error":
            todo.append(rel)
    return todo


def _free_name(natural: str, folder: Path, mine: Callable[[str], bool], taken: set[str]) -> tuple[str, str]:
    """``natural``, or ``stem~2.ext``, ``~3``, ... when a file this command did not write is there or another input
    took the name (compared case-insensitively: some file systems are). Returns (name, why renamed or "")."""
    p = PurePosixPath(natural)
    suffix = "".join(p.suffixes[-2:]) if natural.endswith(KEY_SUFFIX) else p.suffix
    base = natural[: len(natural) - len(suffix)] if suffix else natural
    name, k, why = natural, 2, ""
    while True:
        if name.casefold() in taken:
            why = why or f"{natural} is the output name of another input"
        elif os.path.lexists(folder / name) and not mine(name):
            why = why or f"{natural} exists and was not written by this command: left as it is"
        else:
            return name, why
        name, k = f"{base}~{k}{suffix}", k + 1


def assign_outputs(files: list[str], history: History, output_dir: Path) -> dict[str, tuple[str, str]]:
    """rel -> (output name, why it is not the natural one or ""), unique across inputs and never a file this
    command did not write. Names the manifest recorded are kept; inputs whose natural names collide (``a.jpg``
    and ``a.png``) are resolved in sorted order: the input already named ``.png`` keeps its name, the others get
    their full name plus ``.png`` (``a.jpg.png``), then ``~2``, ``~3`` until free."""
    names: dict[str, tuple[str, str]] = {}
    taken: set[str] = set()
    for rel in files:
        recorded = history.rows.get(rel, {}).get("output")
        if isinstance(recorded, str):
            names[rel] = (recorded, "")
            taken.add(recorded.casefold())
    fresh = [rel for rel in files if rel not in names]
    count: dict[str, int] = {}
    for rel in fresh:
        count[natural_output(rel).casefold()] = count.get(natural_output(rel).casefold(), 0) + 1
    for rel in sorted(fresh):
        natural = natural_output(rel)
        why = ""
        if count[natural.casefold()] > 1 and natural != rel:
            why, natural = f"{natural} is also the output name of another input", rel + ".png"
        name, why2 = _free_name(natural, output_dir, lambda n: history.outputs.get(n) == rel, taken)
        taken.add(name.casefold())
        names[rel] = (name, why or why2)
    return names


# -- the worker -----------------------------------------------------------------------------------
class Worker:
    """Loads a method's models once (:meth:`start`); turns an image's bytes into a manifest line and the PNG's
    bytes (:meth:`process`); runs the method's other stages (:meth:`call`). Writes no file."""

    def __init__(self, method: Method, settings: dict, max_pixels: int = int(MAX_MEGAPIXELS * 1e6),
                 env: dict | None = None):
        self.method, self.settings, self.max_pixels = method, settings, int(max_pixels)
        self.env, self.impl, self.recognizer = env or {}, None, None

    def start(self, broadcasts: list = ()) -> None:
        os.environ.update(self.env)
        if self.method.diffusion:  # before anything imports ComfyUI's model management
            pick_device(lambda message: None)  # (the driver said it)
        use_models(self.settings)
        self.impl = self.method.factory(dict(self.settings))
        for stage, args in broadcasts:
            self.call(stage, *args)

    def call(self, stage: str, *args):
        return getattr(self.impl, stage)(*args)

    def process(self, rel: str, data: bytes, seed: int) -> dict:
        from ..guidance.face.base import NoFaceError
        from ..guidance.image_files import decode_image, encode_png, to_uint8
        row = {"file": rel, "method": self.method.name, "parameters": self.settings, "seed": seed}
        started, png, key = time.monotonic(), None, None
        try:
            image = decode_image(data, PurePosixPath(rel).name, self.max_pixels)
            protect = getattr(self.impl, "protect", self.impl)
            result = protect(image, seed)
            out = result.image
            if out.dim() != 3 or out.shape[-1] != 3 or not bool(torch.isfinite(out).all()):
                raise ValueError(f"the method returned {tuple(out.shape)} pixels, not finite (H, W, 3): nothing was "
                                 "written")
            if out.shape == image.shape and (to_uint8(out) == to_uint8(image)).all():
                raise ValueError("the protected image is identical to the input: nothing was protected (check the "
                                 "settings)")
            png, key = encode_png(out), result.key
            row.update(status="ok", **{k: v for k, v in result.info.items() if k not in row})
            if result.plan is not None:  # where the photo was cut: each face's square, box and pasted mask
                row["face_crops"] = result.plan.as_dict()
            if self.settings.get("receipt", True):
                row.update(self.receipt(image, out, result.plan))
        except NoFaceError as e:
            row.update(status="no_face", error=str(e))
        except Exception as e:  # noqa: BLE001  one image's failure, whatever it is, is that image's line
            row.update(status="error", error=str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        row["seconds"] = round(time.monotonic() - started, 3)
        return {"row": row, "png": png, "key": key}

    def receipt(self, image: torch.Tensor, out: torch.Tensor, plan=None) -> dict:
        """One output's receipt as manifest fields (:mod:`.receipt`), judged by the receipt's recognizer (dlib, which
        no method is guided by) on the delivered image after 8-bit rounding: the faces of the method's ``plan`` (the
        faces it cut and protected, with their crop sizes), or every face dlib finds in the original. A receipt
        that cannot be measured says why in ``receipt_error``; it never fails the image."""
        from .pipeline import full_size_plan
        from .receipt import manifest_fields, measure_receipt, receipt_recognizer, unavailable_receipt
        try:
            if self.recognizer is None:
                self.recognizer = receipt_recognizer(getattr(self.impl, "guided_by", None))
            h, w = image.shape[:2]
            if out.shape != image.shape:
                raise ValueError(f"the output is {out.shape[1]}x{out.shape[0]}, not the photo's {w}x{h}")
            if plan is None:
                faces = self.recognizer.detect(image)
                plan = full_size_plan(faces, range(len(faces)), h, w)
            receipt = measure_receipt(image, out, plan, self.recognizer,
                                      guided_by=getattr(self.impl, "guided_by", None), method=self.method.name)
        except Exception as e:  # noqa: BLE001  the image is protected; only its receipt is missing, and says why
            receipt = unavailable_receipt(f"{type(e).__name__}: {e}", self.method.name)
        return manifest_fields(receipt)


@dataclass
class Job:
    key: object
    stage: str
    args: Callable[[], tuple]  # called when the job is sent (reads the file then: few bytes in flight)
    attempts: int = 0


@dataclass
class Failed:
    """A job that could not run (its arguments failed, or its worker died ``retries + 1`` times)."""
    error: str


class LocalPool:
    """The Worker in this process."""

    def __init__(self, worker: Worker):
        self.worker = worker
        try:
            worker.start()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001  a method that cannot load stops the run with a message, not a trace
            raise ValueError(f"the method could not load: {type(e).__name__}: {e}") from e

    def broadcast(self, stage: str, *args) -> None:
        self.worker.call(stage, *args)

    def map(self, jobs, done: Callable) -> None:
        for job in jobs:
            try:
                args = job.args()
            except ValueError as e:
                done(job, Failed(str(e)))
                continue
            done(job, self.worker.process(*args) if job.stage == "process" else self.worker.call(job.stage, *args))

    def close(self) -> None:
        pass


class _RayWorker:
    """The actor: a Worker whose construction errors come back as text (a method that cannot load stops the run
    with its message instead of being restarted forever)."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def start(self, broadcasts) -> str | None:
        import ray
        try:  # the broadcast values travel as object refs inside a list: Ray resolves only top-level arguments
            self.worker.start([(stage, tuple(ray.get(list(args)))) for stage, args in broadcasts])
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        return None

    def run(self, stage: str, *args):
        if stage != "process":
            return self.worker.call(stage, *args)
        import ray
        result = self.worker.process(*args)
        result["row"]["node"] = ray.get_runtime_context().get_node_id()  # which machine did it
        return result


class RayPool:
    """``count`` actors; each job goes to an idle actor. An actor that dies (its process crashed, its node went
    away, its result was lost) is replaced, and its job sent again, ``retries`` times at most: then the job fails
    as :class:`Failed`. A replacement that cannot be placed (no free CPU/GPU left) waits while the others work;
    with no actor left for ``start_timeout`` seconds the run stops with a message."""

    def __init__(self, worker: Worker, count: int, gpus: int, retries: int = RETRIES, start_timeout: float = 600.0,
                 log=_log_default):
        import ray
        self.ray, self.worker, self.count, self.retries, self.log = ray, worker, count, retries, log
        self.cls = ray.remote(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0, max_restarts=0,
                              max_task_retries=0)(_RayWorker)
        self.start_timeout, self.broadcasts = start_timeout, []
        self.actors: dict[int, object] = {}
        self.seen: dict[int, int] = {}  # actor id -> how many broadcasts it was started with
        self.starting: dict[object, int] = {}  # start() ref -> actor id
        self.idle: deque = deque()
        self.next_id, self.deaths = 0, 0
        for _ in range(count):
            self._spawn()
        self._wait_one_ready()

    def _spawn(self) -> None:
        aid, self.next_id = self.next_id, self.next_id + 1
        actor = self.cls.remote(self.worker)
        self.actors[aid] = actor
        self.seen[aid] = len(self.broadcasts)
        self.starting[actor.start.remote(list(self.broadcasts))] = aid

    def _retire(self, aid: int) -> None:
        actor = self.actors.pop(aid, None)
        if aid in self.idle:
            self.idle.remove(aid)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001  already gone
                pass

    def _started(self, ref) -> None:
        aid = self.starting.pop(ref)
        try:
            error = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:  # died while loading: replaced below, counted against all
            self._retire(aid)
            self.deaths += 1
            if self.deaths > self.retries + self.count:
                raise ValueError(f"the workers keep dying while they load the method: {e}") from None
            self._spawn()
            return
        if error:
            raise ValueError(f"the method could not load on a worker: {error}")
        try:
            for stage, args in self.broadcasts[self.seen[aid]:]:  # broadcast while it was starting
                self.ray.get(self.actors[aid].run.remote(stage, *args))
        except self.ray.exceptions.RayTaskError as e:
            raise ValueError(f"{stage} failed on a worker: {e}") from None
        except self.ray.exceptions.RayError:  # died meanwhile: a replacement starts with every broadcast
            self._retire(aid)
            self._spawn()
            return
        self.idle.append(aid)

    def _wait_one_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.idle:
            if not self.starting:
                self._spawn()
            ready, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                raise ValueError(f"no worker started within {self.start_timeout:.0f} s: does the cluster have a "
                                 "free CPU (or GPU)?")
            self._started(ready[0])

    def broadcast(self, stage: str, *args) -> None:
        """Run ``stage(*args)`` on every actor, now and on each actor started later."""
        ref_args = tuple(self.ray.put(a) for a in args)
        self.broadcasts.append((stage, ref_args))

        def check(job, value) -> None:
            if isinstance(value, Failed):
                raise ValueError(f"{stage} failed on a worker: {value.error}")
        self.map([Job(("broadcast", aid), stage, lambda a=ref_args: a) for aid in list(self.idle)], check, pin=True)

    def map(self, jobs, done: Callable, pin: bool = False) -> None:
        pending = deque(jobs)
        inflight: dict[object, tuple[int, Job]] = {}
        last_progress = time.monotonic()
        while pending or inflight:
            while pending and self.idle:
                job = pending.popleft()
                aid = job.key[1] if pin else self.idle[0]
                if aid not in self.idle:
                    continue  # a pinned job's actor died: the broadcast reaches its replacement at its start
                try:
                    args = job.args()
                except ValueError as e:
                    done(job, Failed(str(e)))
                    continue
                self.idle.remove(aid)
                inflight[self.actors[aid].run.remote(job.stage, *args)] = (aid, job)
            waiting = list(inflight) + list(self.starting)
            if not waiting:
                self._spawn()
                continue
            ready, _ = self.ray.wait(waiting, num_returns=1, timeout=5.0)
            if not ready:
                if inflight or self.idle or time.monotonic() - last_progress < self.start_timeout:
                    continue
                raise ValueError(f"no worker is left and none started within {self.start_timeout:.0f} s: does the "
                                 "cluster still have a free CPU (or GPU)?")
            ref = ready[0]
            last_progress = time.monotonic()
            if ref in self.starting:
                self._started(ref)
                continue
            aid, job = inflight.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:  # the stage itself raised (process() never does)
                self.idle.append(aid)
                done(job, Failed(str(e.cause if getattr(e, "cause", None) else e).splitlines()[-1]))
                continue
            except self.ray.exceptions.RayError as e:  # the actor died or its node went away
                self._retire(aid)
                self._spawn()
                job.attempts += 1
                if pin:
                    continue
                if job.attempts > self.retries:
                    done(job, Failed(f"its worker process died {job.attempts} time{'s' * (job.attempts > 1)} while "
                                     f"working on it (a crash or a lost node; last: {type(e).__name__})"))
                else:
                    self.log(f"a worker died ({type(e).__name__}); retrying that job ({job.attempts}/{self.retries})")
                    pending.appendleft(job)
                continue
            self.idle.append(aid)
            done(job, value)

    def close(self) -> None:
        for aid in list(self.actors):
            self._retire(aid)


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


def start_ray(address: str = "", actors: int = 2) -> None:
    """Join the cluster at ``address``, or start Ray on this machine: on 127.0.0.1 only (every Ray process; a
    cluster the user names is the user's choice)."""
    check_ray_address(address)
    local = address in ("", "local")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    import ray
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": worker_python_path(),
                                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
             ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
             **({"num_cpus": max(actors, 1), "_node_ip_address": "127.0.0.1"} if local else {"address": address}))


@dataclass
class RunContext:
    """What a method's ``prepare`` sees: the images to use (never the problem entries), how to read one, where
    keys go, the run's seed and id, and this run's temporary names."""
    files: list[str]
    read: Callable[[str], bytes]
    keys_dir: Path
    seed: int
    run_id: str


def run(method, input_dir, output_dir, keys_dir, settings: dict | None = None, seed: int = 0,
        use_ray: bool | None = None, address: str = "", actors: int = 2, password_env: str = "",
        retry_errors: bool = False, progress: bool = True, log=_log_default, methods: dict | None = None,
        retries: int = RETRIES, max_megapixels: float = MAX_MEGAPIXELS, max_file_mb: float = MAX_FILE_MB,
        start_timeout: float = 600.0) -> dict:
    """Check, lock, plan, run and summarise. ``method``: a :class:`Method`, or a name in ``methods``.
    ``use_ray`` None: Ray when it is installed (and says so when it is not)."""
    m = resolve_method(method, methods)
    input_dir, output_dir, keys_dir = Path(input_dir), Path(output_dir), Path(keys_dir)
    typed = m.validate(settings or {})
    if password_env and not os.environ.get(password_env):
        raise ValueError(f"the key password variable {password_env} is not set (keys are sealed with its value)")
    if not (math.isfinite(max_megapixels) and max_megapixels > 0 and math.isfinite(max_file_mb) and max_file_mb > 0):
        raise ValueError("--max-megapixels and --max-file-mb must be positive numbers")
    if int(retries) != retries or retries < 0:
        raise ValueError(f"--retries must be a whole number >= 0, got {retries}")
    check_folders(input_dir, output_dir, keys_dir)
    if use_ray is None:
        try:
            import ray  # noqa: F401
            use_ray = True
        except ImportError:
            log("Ray is not installed: running in this process (pip install ray to scale out)")
            use_ray = False
    if m.diffusion:  # before anything imports ComfyUI; the workers pick theirs (a driver without a GPU is fine)
        pick_device(log if not use_ray else (lambda message: None))
    run_id = uuid.uuid4().hex[:12]
    locks = [FolderLock(output_dir, run_id, log), FolderLock(keys_dir, run_id, log)]
    try:
        for lock in locks:
            lock.acquire()
        return _run_locked(m, typed, input_dir, output_dir, keys_dir, seed, use_ray, address, actors, password_env,
                           retry_errors, progress, log, retries, max_megapixels, max_file_mb, start_timeout, run_id)
    finally:
        for lock in locks:
            lock.release()


def _run_locked(m: Method, settings, input_dir, output_dir, keys_dir, seed, use_ray, address, actors, password_env,
                retry_errors, progress, log, retries, max_megapixels, max_file_mb, start_timeout, run_id) -> dict:
    started = time.monotonic()
    manifest = Manifest(output_dir)
    history = History.of(manifest)
    leftovers = remove_own_temp_files(output_dir, history.run_ids) + remove_own_temp_files(keys_dir, history.run_ids)
    if leftovers:
        log(f"removed {leftovers} temporary file(s) a killed run of this folder left; their images are done again")
    manifest.append({"run": run_id, "event": "start", "host": socket.gethostname(), "pid": os.getpid(),
                     "method": m.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    files, problems = scan_input(input_dir)
    todo = plan(files, history.rows, output_dir, retry_errors)
    log(f"{len(files)} file(s), {len(files) - len(todo)} already finished, {len(todo)} to do ({m.name})")
    names = assign_outputs(files, history, output_dir)
    password = os.environ.get(password_env) if password_env else None
    bar = Progress(len(todo)) if progress and todo else None
    ran: list[dict] = []
    writes = {"output": 0, "key": 0}

    def finish(row: dict) -> None:
        row["run"] = run_id
        manifest.append(row)
        ran.append(row)
        if bar:
            bar.update()

    for rel in todo:
        if rel in problems:
            finish({"file": rel, "method": m.name, "status": "error", "error": problems[rel]})
    images = [rel for rel in todo if rel not in problems]
    max_bytes = int(max_file_mb * 2**20)

    def read(rel: str) -> bytes:
        return read_input(input_dir / rel, PurePosixPath(rel).name, max_bytes)

    def commit(job: Job, result) -> None:
        rel = job.key
        if isinstance(result, Failed):
            finish({"file": rel, "method": m.name, "parameters": settings, "seed": image_seed(seed, rel),
                    "status": "error", "error": result.error})
            return
        row = result["row"]
        if row["status"] != "ok":
            finish(row)
            return
        out_name, why = names[rel]
        key_name = None
        if result["key"] is not None:
            key_name, key_why = _free_name(rel + KEY_SUFFIX, keys_dir, lambda n: history.keys.get(n) == rel, set())
            why = "; ".join(w for w in (why, key_why) if w)
        manifest.append({"file": rel, "status": "writing", "run": run_id, "output": out_name, "key_file": key_name})
        history.outputs[out_name] = rel
        try:
            if key_name is not None:
                from ..inversion.keyfile import key_file_bytes
                tensors, metadata = result["key"]
                history.keys[key_name] = rel
                write_file(keys_dir / key_name, key_file_bytes(tensors, metadata, password), run_id, mode=0o600)
                writes["key"] += 1
                row.update(key_file=key_name, key_sealed=bool(password))
            write_file(output_dir / out_name, result["png"], run_id)
            writes["output"] += 1
        except OSError as e:
            row.update(status="error", error=f"cannot write {out_name}: {e.strerror or e}")
        else:
            row["output"] = out_name
            if why:
                row["renamed"] = why
        finish(row)

    startup = 0.0
    if images:
        ray_started = time.monotonic()
        worker = Worker(m, settings, int(max_megapixels * 1e6),
                        env={k: os.environ[k] for k in ("DIFFPRIVACY_MODELS_DIR",) if k in os.environ})
        pool = None
        try:
            if use_ray:
                start_ray(address, actors)
                import ray
                gpus = int(ray.cluster_resources().get("GPU", 0))
                pool = RayPool(worker, gpus or max(actors, 1), gpus, retries, start_timeout, log)
                if m.diffusion and not gpus:
                    log("the Ray cluster has no GPU: the diffusion method runs on CPU actors; expect minutes per "
                        "image at 512x512")
            else:
                pool = LocalPool(worker)
            startup = time.monotonic() - ray_started  # Ray's start (or the local worker's) until a worker is ready
            if m.prepare is not None:
                usable = [rel for rel in files if rel not in problems]  # the whole set, finished images included
                m.prepare(settings, RunContext(usable, read, keys_dir, seed, run_id), pool, log)
            jobs = (Job(rel, "process", lambda rel=rel: (rel, read(rel), image_seed(seed, rel))) for rel in images)
            pool.map(jobs, commit)
        finally:
            if pool is not None:
                pool.close()
            if use_ray:
                import ray
                ray.shutdown()
    final = Manifest(output_dir).read()
    counts: dict[str, int] = {}
    for rel in files:
        status = final.get(rel, {}).get("status", "missing")
        counts[status] = counts.get(status, 0) + 1
    return {"files": len(files), "ran": len(ran), "status": counts, "ray": bool(use_ray and images),
            "run": run_id, "writes": writes, "startup_s": round(startup, 2),
            "seconds": round(time.monotonic() - started, 2)}


__all__ = ["FolderLock", "Manifest", "Method", "Protected", "Setting", "Worker", "assign_outputs",
           "check_folders", "list_dataset", "plan", "run", "scan_input"]
