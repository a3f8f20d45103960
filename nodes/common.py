"""The ComfyUI conventions every node module of the pack shares (not a node module).

- :func:`tip`: an input's options with its tooltip (every input has one);
- :class:`StepProgress`: ComfyUI's progress bar plus a line of text, checking for Cancel;
- :func:`list_key_files` / :func:`resolve_key_path` / :func:`key_file_name`: key files under
  output/diffprivacy/ (the name a saver shows is the one the loaders list), and nowhere outside
  ComfyUI's output and input folders;
- :func:`write_new_output_file`: output files under new names, never replacing an existing file;
- :func:`rgb_batch` / :func:`paired_batches` / :func:`parse_labels`: IMAGE batches and per-image labels;
- :data:`PASSWORD_WARNING`: what every password widget says about where its value travels.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from ..guidance.host import check_interrupt, progress_bar, send_progress_text
from ..guidance.progress import Step
from ..guidance.working_image import MAX_SIDE

CATEGORY = "Diff-Privacy"
MAX_NAME_TRIES = 1000
KEY_SUBFOLDER = "diffprivacy"  # under the output folder; the key loaders list key files from here
KEY_SUFFIX = ".safetensors"

# Widget values, passwords included, travel in the workflow JSON (and in the server's history).
PASSWORD_WARNING = ("The password is stored in the workflow JSON like any widget value: do not save or share "
                    "workflows that contain it, and save protected images with the no-metadata saver.")


# Input types whose values carry numbers, and where those numbers sit: checked for NaN / infinity on entry.
NUMERIC_INPUTS = {"FLOAT": None, "IMAGE": None, "MASK": None, "LATENT": "samples", "FACE_EMBEDDING": "embedding"}
NUMERIC_ADVICE = {
    "IMAGE": "the node that made this image produced NaN or infinity (check its settings); an image holds values in "
             "0..1",
    "MASK": "the node that made this mask produced NaN or infinity (check its settings); a mask holds values in 0..1",
    "LATENT": "the node that made this latent produced NaN or infinity (in fp16, try fp32), or the key file is damaged",
    "FACE_EMBEDDING": "embed the face again with Face Embedding (the recognizer produced NaN or infinity)",
}


# torch's words for tensors whose sizes disagree: a node turns them into a message in the user's terms
SHAPE_ERRORS = ("must match the size of tensor", "The expanded size of the tensor", "size mismatch",
                "shapes cannot be multiplied", "is invalid for input of size", "Sizes of tensors must match",
                "must match the existing size")


def typed_input_names(cls, types=("FLOAT",)) -> list[tuple[str, str]]:
    """(name, type) of the inputs of ``types`` a node class declares (required and optional)."""
    spec_of = cls.INPUT_TYPES()
    return [(name, spec[0]) for section in ("required", "optional") for name, spec in spec_of.get(section, {}).items()
            if isinstance(spec, tuple) and spec and isinstance(spec[0], str) and spec[0] in types]


def float_input_names(cls) -> list[str]:
    """The FLOAT inputs a node class declares (required and optional)."""
    return [name for name, _ in typed_input_names(cls)]


def _numbers_of(value, kind: str):
    key = NUMERIC_INPUTS[kind]
    if key is not None:
        return value.get(key) if isinstance(value, dict) else None
    return value


def guard_float_inputs(cls) -> None:
    """Make a node refuse NaN and infinity in its number-carrying inputs (FLOAT, IMAGE, MASK, a LATENT's samples,
    a FACE_EMBEDDING's embedding), naming the input and saying what to do (:func:`guidance.weights.require_finite`,
    the one finite check of the pack).

    ComfyUI checks min/max, which NaN passes (every comparison with NaN is false), and the API accepts
    NaN in JSON: a NaN weight used to give a "successful" run with a black image and a saved key; a NaN IMAGE
    made by another node ran as "no face found, image unchanged". Applied to every node of the pack when it is
    registered (``nodes/__init__.py``). Numbers typed into STRING widgets are checked where they are parsed.
    torch's errors about tensor sizes that disagree are turned into a message that says what to check.
    """
    import functools

    from ..guidance.weights import require_finite

    try:
        typed = typed_input_names(cls, tuple(NUMERIC_INPUTS))
    except Exception:  # an input list that cannot be built now (e.g. a folder problem): ComfyUI will say so
        return
    function = getattr(cls, cls.FUNCTION)
    if getattr(function, "_finite_floats", False):
        return

    @functools.wraps(function)
    def checked(self, *args, **kwargs):
        for name, kind in typed:
            values = kwargs.get(name)
            for v in values if isinstance(values, list) else [values]:  # INPUT_IS_LIST nodes get lists
                if kind == "FLOAT":
                    if isinstance(v, (int, float)) and not math.isfinite(v):
                        raise ValueError(f"{cls.__name__}: {name} is {v}; it must be a finite number")
                else:
                    require_finite(_numbers_of(v, kind), f"{cls.__name__}: the {kind} input {name}",
                                   NUMERIC_ADVICE[kind])
        try:
            return function(self, *args, **kwargs)
        except RuntimeError as e:
            if not any(marker in str(e) for marker in SHAPE_ERRORS):
                raise
            import logging
            logging.getLogger("diffprivacy").warning("[Diff-Privacy] %s: %s", cls.__name__, e)
            if "state_dict" in str(e):
                raise ValueError(f"{cls.__name__}: a model file chosen here does not fit the network it is read "
                                 "into (its tensors have other sizes): it is another model, or another version of "
                                 "it, than this input expects. Choose the file the input's tooltip names. (torch's "
                                 "message is in the server log.)") from None
            raise ValueError(f"{cls.__name__}: the inputs connected here do not fit together (two of them have sizes "
                             "that disagree). Check that they belong together: images and masks of the same size "
                             "and batch, latents made with this model's VAE at the working resolution, an SD 1.5 "
                             "model with SD 1.5 adapters. (torch's message is in the server log.)") from None

    checked._finite_floats = True
    setattr(cls, cls.FUNCTION, checked)


def tip(text: str, **options) -> dict:
    """An input's option dict with its tooltip."""
    return dict(options, tooltip=text)


def whole_frame_gradient_options(gradient: str) -> tuple:
    """The optional ``gradient_options`` input of a method whose gradient decodes the whole frame (FSAP, De-ID):
    ``gradient`` names whose gradient it is."""
    return ("GRADIENT_OPTIONS", tip(
        f"Which decoder {gradient} runs through (Diff-Privacy Gradient Options: the full VAE, ComfyUI's tiny preview "
        "decoder from models/vae_approx, or auto); unconnected: the full VAE. Its face window does not apply here "
        "(the whole frame is decoded), nor do chunking, checkpointing and precision; the output image is always "
        "decoded with the full VAE."))


RESOLUTION_TIP = ("Working resolution: each face crop (or, in whole-frame mode, the photo letterboxed to a square, "
                  "never squashed) is resized to resolution x resolution exactly as Learn Key-E prepares it (bicubic, "
                  "antialiased; SD 1.5 and the reference work at 512). {what} 0 keeps the crop's own size (a "
                  "multiple of 8). At most {max_side} pixels a side, with 0 too (downscale larger photos first). "
                  "Protection and Make Key-I must use the same value for recovery to match.")


def pipeline_input(faces_note: str = "") -> tuple:
    """The optional ``pipeline`` input of every protect node (Diff-Privacy Face Pipeline, :mod:`methods.pipeline`)."""
    return ("FACE_PIPELINE", tip(
        "How the photo is protected (Diff-Privacy Face Pipeline): each chosen face cropped square with a crop "
        "factor, resized to the working resolution, protected, and pasted back through a feathered mask into the "
        "photo at its own size (every other pixel untouched), or the whole frame letterboxed; also the receipt's "
        "recognizer. Unconnected: face crops, crop factor 3.0, feather 5 px, all faces, receipt under dlib."
        + faces_note))


def receipt_outputs(receipts: list[dict], text_lines: list[str], receipt_text) -> tuple[str, list[str]]:
    """(the receipt STRING output: one photo's receipt as JSON, a batch's as a JSON list; the ``ui`` text lines)."""
    import json
    value = receipts[0] if len(receipts) == 1 else receipts
    return json.dumps(value, sort_keys=True), text_lines + [receipt_text(r) for r in receipts]


def resolution_input(what: str):
    """The shared working-resolution widget (see :mod:`guidance.working_image`)."""
    return ("INT", tip(RESOLUTION_TIP.format(what=what, max_side=MAX_SIDE), default=512, min=0, max=MAX_SIDE, step=8))


class StepProgress:
    """ComfyUI's progress bar, the text under the node (throttled) and a Cancel check: the nodes' receiver of the
    pack's one progress shape.

    Call it with a :class:`~..guidance.progress.Step` (what every method, training run and evaluation sends); it
    raises ComfyUI's interrupt exception when the user pressed Cancel. Works without a server (then it only counts).
    """

    def __init__(self, total: int, node_id=None, text_every_s: float = 0.5):
        self.total = max(int(total), 1)
        self.bar = progress_bar(self.total)
        self.node_id = node_id
        self.text_every_s = text_every_s
        self._last_text = 0.0

    def __call__(self, step: Step, preview=None) -> None:
        """One :class:`~..guidance.progress.Step` (the pack's one progress shape: its own total, its text)."""
        if not isinstance(step, Step):
            raise TypeError(f"progress takes a guidance.progress.Step, got {type(step).__name__}")
        self.total = max(int(step.total), 1)
        done, text = step.done, step.text or None
        if self.bar is not None:
            self.bar.update_absolute(done, self.total, preview)
        if text is not None:
            now = time.monotonic()
            if now - self._last_text > self.text_every_s or done >= self.total:
                self._last_text = now
                send_progress_text(text, self.node_id)
        check_interrupt()

    def finish(self, text: str) -> None:
        """The bar full and ``text`` (what the run ended with) as the node's last progress line: a run that
        stops early must not leave "iteration 13/200" on the node."""
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total)
        send_progress_text(text, self.node_id)


def write_new_output_file(filename_prefix: str, suffix: str, write, image_size: tuple[int, int] | None = None
                          ) -> tuple[Path, str]:
    """Write a new file ``{prefix}_{counter:05}_{suffix}`` under ComfyUI's output folder; never replace one.

    ``filename_prefix`` may name a subfolder ("diffprivacy/key"); ComfyUI's own rule refuses one that
    leaves the output folder. ``write(path)`` must create the file exclusively and raise FileExistsError
    when it exists (another run may take a name between the folder scan and the write): the counter then
    goes up. Returns (path, the name relative to the output folder, for the UI).
    """
    import folder_paths
    width, height = image_size if image_size is not None else (0, 0)
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for _ in range(MAX_NAME_TRIES):
        file = f"{name}_{counter:05}_{suffix}"
        path = Path(folder) / file
        try:
            write(path)
        except FileExistsError:
            counter += 1
            continue
        return path, f"{subfolder}/{file}" if subfolder else file
    raise ValueError(f"no free file name for prefix {filename_prefix!r} after {MAX_NAME_TRIES} tries")


def claim_unused(path: Path) -> None:
    """A ``write`` for :func:`write_new_output_file` that only checks the name is free (the caller writes later)."""
    if path.exists():
        raise FileExistsError(path)


def rgb_batch(image, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE as (B, H, W, 3) float: grayscale repeated, alpha dropped, other layouts refused."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise ValueError(f"{name} must be an IMAGE batch (B, H, W, C), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise ValueError(f"{name} has {c} channels; expected RGB (3), RGBA (4) or grayscale (1)")
    return image.float()


def paired_batches(a, b, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two IMAGE batches compared image by image: both RGB, equally long."""
    a, b = rgb_batch(a, name_a), rgb_batch(b, name_b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} image(s) but {name_b} has {b.shape[0]}: image i of one is "
                         f"compared with image i of the other, so the batches must be equally long")
    return a, b


def parse_labels(text: str, n: int) -> list[str]:
    """One identity label per image, separated by commas or new lines."""
    labels = [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
    if len(labels) != n:
        raise ValueError(f"identities lists {len(labels)} label(s) but there are {n} image(s): give one label per "
                         f"image, in batch order, separated by commas (e.g. 'anna, anna, ben')")
    return labels


def key_folder() -> Path:
    import folder_paths
    return Path(folder_paths.get_output_directory()) / KEY_SUBFOLDER


def list_key_files() -> list[str]:
    """Key files under output/diffprivacy/, as forward-slash paths relative to it."""
    root = key_folder()
    if not root.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.endswith(KEY_SUFFIX) and not f.startswith("."):
                found.append((Path(folder) / f).relative_to(root).as_posix())
    return sorted(found)


def key_file_name(path: Path) -> str:
    """How a saver names a key file it wrote: the name the key loaders list and load (relative to
    output/diffprivacy/); a file saved elsewhere is named by its path relative to the output folder, with
    how to load it (key_path)."""
    import folder_paths
    path = Path(path).resolve()
    root = key_folder().resolve()
    if _inside(path, root):
        return path.relative_to(root).as_posix()
    output = Path(folder_paths.get_output_directory()).resolve()
    shown = path.relative_to(output).as_posix() if _inside(path, output) else str(path)
    return f"{shown} (outside output/{KEY_SUBFOLDER}/: not listed by the loaders; give it as key_path)"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_key_path(key_file: str, key_path: str = "") -> Path:
    """The key file to read: ``key_path`` when given (under ComfyUI's output or input folder), else
    ``key_file`` relative to output/diffprivacy/. Reading elsewhere is refused: a server must not be
    made to open arbitrary files."""
    import folder_paths
    output = Path(folder_paths.get_output_directory()).resolve()
    if key_path and key_path.strip():
        p = Path(key_path.strip()).expanduser()
        p = (p if p.is_absolute() else output / p).resolve()
        roots = (output, Path(folder_paths.get_input_directory()).resolve())
        if not any(_inside(p, r) for r in roots):
            raise ValueError(f"key_path must lie inside ComfyUI's output or input folder ({roots[0]} or {roots[1]}); "
                             f"got {p}")
        return p
    if not key_file:
        raise ValueError(f"no key file chosen: save one with Save Key (it lands in output/{KEY_SUBFOLDER}/), "
                         "press R in the canvas to list it, and pick it; or give key_path")
    root = key_folder().resolve()
    p = (root / key_file).resolve()
    if not _inside(p, root):
        raise ValueError(f"key_file must lie inside output/{KEY_SUBFOLDER}/; got {key_file!r}")
    if not p.is_file():
        listed = list_key_files()
        raise ValueError(f"key file {key_file!r} not found in {root}: key_file is a name in that folder, as the saver "
                         f"shows it and the list offers it (press R in the canvas to refresh the list); there now: "
                         f"{', '.join(listed[:8]) + (' ...' if len(listed) > 8 else '') if listed else 'none'}")
    return p


def key_file_digest(key_file: str, key_path: str = "") -> str:
    """What a key loader's IS_CHANGED returns: the chosen file's content hash (a new key under the same name
    reloads), or a marker when it cannot be read (the node then runs and says why)."""
    import hashlib
    try:
        return hashlib.sha256(resolve_key_path(key_file, key_path or "").read_bytes()).hexdigest()
    except (OSError, ValueError):
        return f"unreadable:{key_file}:{key_path}"
