"""Key files and metadata-free image saving, as ComfyUI nodes.

- DiffPrivacySaveKey: Key-I (LATENT) + Key-E (CONDITIONING) + the settings needed to use them,
  into one key file under ComfyUI's output folder, sealed when a password is given.
- DiffPrivacyLoadKey: the inverse, refusing keys made for another model or text encoder.
- DiffPrivacySaveImageClean: PNGs with no metadata at all and names that are a prefix and a
  counter only. Stock SaveImage embeds the workflow, which holds the key file's name, the
  password and the original image's name: a protected image must carry none of them.

Keys are never put into image or latent metadata; the file format is in inversion/keyfile.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import folder_paths
import numpy as np
import torch
from PIL import Image

from ..guidance.schedule import NUM_STAGES, split_stage_conditioning
from ..inversion.fingerprint import clip_fingerprint, model_fingerprint
from ..inversion.keyfile import (KEY_E, KEY_E_POOLED, KEY_I, META_IMAGE_HEIGHT, META_IMAGE_WIDTH, META_STEPS,
                                 META_STRENGTH, META_TAU, KeyFileExistsError, check_compatible, key_bundle_metadata,
                                 metadata_number, read_key_file, write_key_file)

log = logging.getLogger("diffprivacy")

KEY_SUBFOLDER = "diffprivacy"  # under the output folder; DiffPrivacyLoadKey lists key files from here
KEY_SUFFIX = ".safetensors"
LATENT_SCALE = 8  # pixels per latent cell (SD-family VAEs)
_MAX_NAME_TRIES = 1000
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif")

# Widget values, passwords included, travel in the workflow JSON (and in the server's history).
WORKFLOW_WARNING = ("The password is stored in the workflow JSON like any widget value: do not save or share "
                    "workflows that contain it, and save protected images with the no-metadata saver.")


# ---------------------------------------------------------------- conversions

def key_tensors_from_comfy(key_i: dict, key_e) -> dict:
    """Key tensors from a LATENT (Key-I) and a stage CONDITIONING (Key-E, ten entries or a batch of ten)."""
    samples = key_i.get("samples") if isinstance(key_i, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] != 1:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else None
        raise ValueError(f"key_i must be a LATENT of one image, [1, channels, h, w]; got samples of shape {shape}")
    stages = split_stage_conditioning(key_e)
    shapes = {tuple(s[0].shape[1:]) for s in stages}
    if len(shapes) != 1 or any(s[0].ndim != 3 or s[0].shape[0] != 1 for s in stages):
        raise ValueError(f"key_e stages must all be [1, tokens, width] of one shape; got {sorted(shapes)}")
    tensors = {KEY_I: samples, KEY_E: torch.cat([s[0] for s in stages], dim=0)}
    pooled = [s[1].get("pooled_output") for s in stages]
    if all(isinstance(p, torch.Tensor) for p in pooled):
        tensors[KEY_E_POOLED] = torch.cat([p.reshape(1, -1) for p in pooled], dim=0)
    return tensors


def comfy_from_key_tensors(tensors: dict, metadata: dict):
    """(LATENT, CONDITIONING with one entry of batch ten) from a key file's tensors."""
    if KEY_I not in tensors or KEY_E not in tensors:
        missing = [n for n in (KEY_I, KEY_E) if n not in tensors]
        raise ValueError(f"this key file holds no {' / '.join(missing)} (is it a Key-E training file rather than "
                         "a key bundle?)")
    key_i, key_e = tensors[KEY_I], tensors[KEY_E]
    if key_i.ndim != 4 or key_i.shape[0] != 1:
        raise ValueError(f"this key file is malformed: Key-I has shape {tuple(key_i.shape)}, expected [1, C, h, w]")
    if key_e.ndim != 3 or key_e.shape[0] != NUM_STAGES:
        raise ValueError(f"this key file is malformed: Key-E has shape {tuple(key_e.shape)}, "
                         f"expected [{NUM_STAGES}, tokens, width]")
    if META_IMAGE_WIDTH in metadata and META_IMAGE_HEIGHT in metadata:
        size = (metadata_number(metadata, META_IMAGE_HEIGHT, int), metadata_number(metadata, META_IMAGE_WIDTH, int))
        if size != (key_i.shape[2] * LATENT_SCALE, key_i.shape[3] * LATENT_SCALE):
            raise ValueError(f"this key file is malformed: Key-I of shape {tuple(key_i.shape)} does not match "
                             f"its recorded image size {size[1]}x{size[0]}")
    extra = {}
    if KEY_E_POOLED in tensors:
        extra["pooled_output"] = tensors[KEY_E_POOLED].float()
    return {"samples": key_i.float()}, [[key_e.float(), extra]]


# ---------------------------------------------------------------- paths

def key_folder() -> Path:
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
                         "refresh, and pick it, or give key_path")
    root = key_folder().resolve()
    p = (root / key_file).resolve()
    if not _inside(p, root):
        raise ValueError(f"key_file must lie inside output/{KEY_SUBFOLDER}/; got {key_file!r}")
    return p


# ---------------------------------------------------------------- nodes

class DiffPrivacySaveKey:
    CATEGORY = "Diff-Privacy/keys"
    DESCRIPTION = ("Saves Key-I and Key-E with the step count, schedule, image size and model fingerprints in one "
                   "key file under the output folder (sealed with the password, if one is given). Never overwrites "
                   "a file. Whoever has the key file (and its password) can undo the protection.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("key_path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the key file written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key_i": ("LATENT", {"tooltip": "Key-I: the DDIM-inverted latent of the original image."}),
            "key_e": ("CONDITIONING", {"tooltip": "Key-E: the ten stage conditionings C^0..C^9 (ten entries or one "
                                                  "entry with a batch of ten)."}),
            "model": ("MODEL", {"tooltip": "The diffusion model the keys were made with; its fingerprint is stored "
                                           "so that loading the key with another model is refused."}),
            "clip": ("CLIP", {"tooltip": "The text encoder used; its fingerprint is stored too."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "DDIM step count S the keys were made with; recovery must use the same."}),
            "tau": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Embedding-schedule threshold tau used for protection."}),
            "strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Noise strength S_ns used for protection."}),
            "filename_prefix": ("STRING", {"default": f"{KEY_SUBFOLDER}/key",
                                           "tooltip": "Path and name prefix under the output folder; a counter is "
                                                      f"appended. Keys under '{KEY_SUBFOLDER}/' are listed by "
                                                      "Load Key."}),
            "password": ("STRING", {"default": "", "tooltip": "Password sealing the key file (AES-256-GCM under "
                                                              "scrypt). Leave empty for an unsealed key that anyone "
                                                              "holding the file can use. " + WORKFLOW_WARNING}),
        }, "optional": {
            "protected": ("IMAGE", {"tooltip": "Connect the protected images: the key is then written only after "
                                               "protection succeeded, so a failed run (no face found, interrupted) "
                                               "leaves no key behind. Nothing of these images goes into the file."}),
        }}

    def save(self, key_i, key_e, model, clip, steps, tau, strength, filename_prefix, password, protected=None):
        made_with = (key_i.get("diffprivacy_key_i") or {}).get("steps")  # set by Make Key-I
        if made_with is not None and int(made_with) != steps:
            raise ValueError(f"this Key-I was made with {made_with} DDIM steps but steps is {steps}: recovery from a "
                             f"key saved this way would start at the wrong noise level. Set steps to {made_with}.")
        tensors = key_tensors_from_comfy(key_i, key_e)
        _, _, h, w = tensors[KEY_I].shape
        metadata = key_bundle_metadata(steps=steps, tau=tau, strength=strength, image_width=w * LATENT_SCALE,
                                       image_height=h * LATENT_SCALE, model_fingerprint=model_fingerprint(model),
                                       clip_fingerprint=clip_fingerprint(clip))
        output = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output)
        for _ in range(_MAX_NAME_TRIES):  # another save may take a name between the scan and the write
            file = f"{name}_{counter:05}_{KEY_SUFFIX}"
            try:
                path = write_key_file(Path(folder) / file, tensors, metadata, password or None)
                break
            except KeyFileExistsError:
                counter += 1
        else:
            raise ValueError(f"no free key file name for prefix {filename_prefix!r}")
        shown = f"{subfolder}/{file}" if subfolder else file
        note = "sealed with the password" if password else "NOT sealed: anyone with this file can use the key"
        log.info("[Diff-Privacy] key saved to %s (%s)", path, note)
        return {"ui": {"text": [f"{shown} ({note})"]}, "result": (str(path),)}


class DiffPrivacyLoadKey:
    CATEGORY = "Diff-Privacy/keys"
    DESCRIPTION = ("Loads a key file written by Save Key: Key-I, Key-E and the settings they were made with. Refuses a "
                   "wrong password, a damaged file, and (when model/clip are connected) a key made for another model.")
    RETURN_TYPES = ("LATENT", "CONDITIONING", "INT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("key_i", "key_e", "steps", "tau", "strength")
    OUTPUT_TOOLTIPS = ("Key-I: the inverted latent z_T.", "Key-E: one conditioning entry with a batch of ten stages.",
                       "DDIM step count the keys were made with.", "Embedding-schedule threshold tau.",
                       "Noise strength S_ns.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key_file": (list_key_files(), {"tooltip": f"A key file under output/{KEY_SUBFOLDER}/ (refresh the page "
                                                       "after saving a new one). Ignored when key_path is given."}),
            "password": ("STRING", {"default": "", "tooltip": "Password of a sealed key file; empty for an unsealed "
                                                              "one. " + WORKFLOW_WARNING}),
        }, "optional": {
            "key_path": ("STRING", {"default": "", "tooltip": "Path of the key file (absolute, or relative to the "
                                                              "output folder; it must lie in the output or input "
                                                              "folder). Overrides key_file; connect Save Key's "
                                                              "key_path here to use a key just written."}),
            "model": ("MODEL", {"tooltip": "Optional: the diffusion model to use the key with; a key made for "
                                           "another model is refused."}),
            "clip": ("CLIP", {"tooltip": "Optional: the text encoder; a key made with another one is refused."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, key_file):
        # Checked when the node runs instead: the list is empty until a key is saved, and key_path may replace it.
        return True

    @classmethod
    def IS_CHANGED(cls, key_file="", key_path="", **_):
        try:
            return hashlib.sha256(resolve_key_path(key_file, key_path or "").read_bytes()).hexdigest()
        except (OSError, ValueError):
            return f"unreadable:{key_file}:{key_path}"

    def load(self, key_file, password, key_path="", model=None, clip=None):
        path = resolve_key_path(key_file, key_path or "")
        tensors, metadata = read_key_file(path, password or None)
        check_compatible(metadata, fingerprint=model_fingerprint(model) if model is not None else None,
                         clip_fingerprint=clip_fingerprint(clip) if clip is not None else None)
        latent, conditioning = comfy_from_key_tensors(tensors, metadata)
        return (latent, conditioning, metadata_number(metadata, META_STEPS, int),
                metadata_number(metadata, META_TAU), metadata_number(metadata, META_STRENGTH))


def loaded_file_stems(prompt) -> set[str]:
    """Stems of the image file names a workflow loads (any string input naming an image file)."""
    stems = set()
    for node in (prompt or {}).values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for value in inputs.values():
            if not isinstance(value, str):
                continue
            name = value.strip()
            for tag in (" [input]", " [output]", " [temp]"):
                name = name.removesuffix(tag)
            base = os.path.basename(name.replace("\\", "/"))
            stem, ext = os.path.splitext(base)
            if ext.lower() in _IMAGE_EXTENSIONS and len(stem) >= 3:
                stems.add(stem)
    return stems


def _write_png_exclusive(img: Image.Image, path: str) -> None:
    """Write a PNG with no metadata chunks; never replace an existing file, never leave a partial one."""
    with open(path, "xb") as f:  # "x": an existing image is never replaced
        try:
            img.save(f, format="PNG", compress_level=4)  # no pnginfo: PIL writes no text chunks
        except BaseException:
            f.close()
            os.unlink(path)
            raise


class DiffPrivacySaveImageClean:
    CATEGORY = "Diff-Privacy"
    DESCRIPTION = ("Saves images as PNG with no metadata at all (no workflow, no prompt, no text chunks) under names "
                   "made of the prefix and a counter only. Use it for protected images: stock Save Image embeds the "
                   "workflow, which names the original image and the key file and holds the password.")
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to save."}),
            "filename_prefix": ("STRING", {"default": f"{KEY_SUBFOLDER}/protected",
                                           "tooltip": "Path and name prefix under the output folder; a counter is "
                                                      "appended. It must not contain a loaded image's name."}),
        }, "hidden": {"prompt": "PROMPT"}}  # read only to refuse prefixes naming the original; never written

    def save_images(self, images, filename_prefix=f"{KEY_SUBFOLDER}/protected", prompt=None):
        leaked = [s for s in loaded_file_stems(prompt) if s.lower() in filename_prefix.lower()]
        if leaked:
            raise ValueError(f"filename_prefix {filename_prefix!r} contains the name of a loaded image "
                             f"({leaked[0]!r}); a protected image must not carry the original's name")
        output = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output, images[0].shape[1], images[0].shape[0])
        results = []
        for batch_number, image in enumerate(images):
            pixels = np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            base = name.replace("%batch_num%", str(batch_number))
            for _ in range(_MAX_NAME_TRIES):
                file = f"{base}_{counter:05}_.png"
                try:
                    _write_png_exclusive(img, os.path.join(folder, file))
                    break
                except FileExistsError:
                    counter += 1
            else:
                raise ValueError(f"no free image file name for prefix {filename_prefix!r}")
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}


NODE_CLASS_MAPPINGS = {
    "DiffPrivacySaveKey": DiffPrivacySaveKey,
    "DiffPrivacyLoadKey": DiffPrivacyLoadKey,
    "DiffPrivacySaveImageClean": DiffPrivacySaveImageClean,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacySaveKey": "Save Key (Diff-Privacy)",
    "DiffPrivacyLoadKey": "Load Key (Diff-Privacy)",
    "DiffPrivacySaveImageClean": "Save Image without Metadata (Diff-Privacy)",
}
