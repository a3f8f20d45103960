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

import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from ..inversion.fingerprint import clip_fingerprint, model_fingerprint
from ..inversion.keyfile import refuse_difp
from ..inversion.key_check import check_key_file, check_keys
from ..inversion.key_e import KeyE
from ..inversion.key_bundle import LATENT_SCALE, bundle_from_tensors, bundle_tensors, crop_plans
from ..inversion.keyfile import (KEY_E as KEY_E_TENSOR, KEY_I, META_FACE_CROPS, META_STEPS, META_STRENGTH, META_TAU,
                                 key_bundle_metadata, metadata_number, read_key_file, write_key_file)
from .common import (KEY_SUBFOLDER, KEY_SUFFIX, PASSWORD_WARNING, list_key_files, key_file_digest, key_file_name,
                     resolve_key_path, write_new_output_file)

log = logging.getLogger("diffprivacy")

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif")


# ---------------------------------------------------------------- nodes

class DiffPrivacySaveKey:
    CATEGORY = "Diff-Privacy/keys"
    DESCRIPTION = ("Saves Key-I and Key-E with the step count, schedule, image size and model fingerprints in one "
                   "key file under the output folder (sealed with the password, if one is given). Never overwrites "
                   "a file. Whoever has the key file (and its password) can undo the protection. A Key-I made of "
                   "face crops gives one file per photo: each crop's Key-I, the photo's Key-E and where the crops "
                   "were cut (squares and masks), no pixel of the photo.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("key_path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the key file written (one per line for a batch).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key_i": ("LATENT", {"tooltip": "Key-I: the DDIM-inverted latent of the original image (a batch: one key "
                                            "file per image)."}),
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
                                                              "holding the file can use. " + PASSWORD_WARNING}),
        }, "optional": {
            "protected": ("IMAGE", {"tooltip": "Connect the protected images: the key is then written only after "
                                               "protection succeeded, so a failed run (no face found, interrupted) "
                                               "leaves no key behind. Nothing of these images goes into the file."}),
        }}

    def save(self, key_i, key_e, model, clip, steps, tau, strength, filename_prefix, password, protected=None):
        samples = key_i.get("samples") if isinstance(key_i, dict) else None
        count = samples.shape[0] if isinstance(samples, torch.Tensor) and samples.ndim == 4 else 1
        key_es = KeyE.for_batch(key_e, count)  # a batch gets one key file per image, each with its own Key-E
        for k in key_es:  # the step count, model and text encoders the keys record must be the ones given here
            check_keys(key_i, k.provenance, model=model, clip=clip, steps=steps)
        bundles = key_bundles(key_i, samples, key_es)
        fingerprints = {"model_fingerprint": model_fingerprint(model), "clip_fingerprint": clip_fingerprint(clip)}
        paths, shown = [], []
        for tensors, plan in bundles:
            _, _, h, w = tensors[KEY_I].shape
            metadata = key_bundle_metadata(steps=steps, tau=tau, strength=strength, image_width=w * LATENT_SCALE,
                                           image_height=h * LATENT_SCALE, **fingerprints)
            if plan is not None:
                metadata[META_FACE_CROPS] = json.dumps(plan, sort_keys=True)
            # write_key_file refuses an existing file (KeyFileExistsError is a FileExistsError): the name counts up.
            path, _ = write_new_output_file(
                filename_prefix, KEY_SUFFIX, lambda p, t=tensors, m=metadata: write_key_file(p, t, m, password or None))
            paths.append(str(path))
            shown.append(key_file_name(path))  # what Load Key lists
        note = "sealed with the password" if password else "NOT sealed: anyone with this file can use the key"
        log.info("[Diff-Privacy] %d key file(s) saved: %s (%s)", len(paths), ", ".join(paths), note)
        return {"ui": {"text": [f"{', '.join(shown)} ({note})"]}, "result": ("\n".join(paths),)}


def key_bundles(key_i: dict, samples, key_es: list) -> list[tuple[dict, dict | None]]:
    """(key tensors, face-crop plan or None) per key file: one file per image of a whole-frame Key-I, one per photo
    (all its crops, one Key-E) of a face-crop Key-I."""
    plans = crop_plans(key_i)
    if plans is None:
        count = len(key_es)
        return [(bundle_tensors({**key_i, "samples": samples[i:i + 1]} if count > 1 else key_i,
                                key_es[i].to_conditioning()), None) for i in range(count)]
    counts = [len(p["crops"]) for p in plans]
    if sum(counts) != samples.shape[0]:
        raise ValueError(f"key_i holds {samples.shape[0]} latent(s) but records {sum(counts)} face crop(s): use Make "
                         "Key-I's output as it is")
    out, start = [], 0
    for plan, n in zip(plans, counts):
        own = key_es[start:start + n]
        if any(k is not own[0] and not torch.equal(k.to_tensors()[KEY_E_TENSOR], own[0].to_tensors()[KEY_E_TENSOR])
               for k in own):
            raise ValueError("the face crops of one photo were protected with different Key-Es; a key file holds one "
                             "Key-E per photo: protect every face of a photo with the same Key-E")
        out.append((bundle_tensors({**key_i, "samples": samples[start:start + n]}, own[0].to_conditioning(), n), plan))
        start += n
    return out


class DiffPrivacyLoadKey:
    CATEGORY = "Diff-Privacy/keys"
    DESCRIPTION = ("Loads a key file written by Save Key: Key-I, Key-E and the settings they were made with. Refuses a "
                   "wrong password and a damaged file. Key-I and Key-E come out carrying the step count, image size, "
                   "model and text encoder recorded in the file, so Recover refuses other settings whether or not "
                   "model/clip are connected here (connected, a key made for another model is refused at once).")
    RETURN_TYPES = ("LATENT", "CONDITIONING", "INT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("key_i", "key_e", "steps", "tau", "strength")
    OUTPUT_TOOLTIPS = ("Key-I: the inverted latent z_T.", "Key-E: one conditioning entry with a batch of ten stages.",
                       "DDIM step count the keys were made with.", "Embedding-schedule threshold tau.",
                       "Noise strength S_ns.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key_file": (list_key_files(), {"tooltip": f"A key file under output/{KEY_SUBFOLDER}/, named as Save Key "
                                                       "shows it (press R in the canvas to list one saved since the "
                                                       "page loaded). Ignored when key_path is given."}),
            "password": ("STRING", {"default": "", "tooltip": "Password of a sealed key file; empty for an unsealed "
                                                              "one. " + PASSWORD_WARNING}),
        }, "optional": {
            "key_path": ("STRING", {"default": "", "tooltip": "Path of the key file (absolute, or relative to the "
                                                              "output folder; it must lie in the output or input "
                                                              "folder). Overrides key_file; connect Save Key's "
                                                              "key_path here to use a key just written."}),
            "model": ("MODEL", {"tooltip": "Optional: the diffusion model to use the key with; a key made for "
                                           "another model is refused here (Recover checks it in any case)."}),
            "clip": ("CLIP", {"tooltip": "Optional: the text encoder; a key made with another one is refused."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, key_file):
        # Checked when the node runs instead: the list is empty until a key is saved, and key_path may replace it.
        return True

    @classmethod
    def IS_CHANGED(cls, key_file="", key_path="", **_):
        return key_file_digest(key_file, key_path)

    def load(self, key_file, password, key_path="", model=None, clip=None):
        path = resolve_key_path(key_file, key_path or "")
        tensors, metadata = read_key_file(path, password or None)
        refuse_difp(metadata)  # a DIFP key: name its kind and its node before asking what it records
        check_key_file(metadata, model=model, clip=clip)  # recovery checks the keys again: they carry their provenance
        latent, conditioning = bundle_from_tensors(tensors, metadata)
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


def _png_writer(img: Image.Image):
    """A ``write(path)`` for a PNG with no metadata chunks: never replaces a file, never leaves a partial one."""
    def write(path) -> None:
        with open(path, "xb") as f:  # "x": an existing image is never replaced
            try:
                img.save(f, format="PNG", compress_level=4)  # no pnginfo: PIL writes no text chunks
            except BaseException:
                f.close()
                os.unlink(path)
                raise
    return write


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
        results = []
        for batch_number, image in enumerate(images):
            pixels = np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            prefix = filename_prefix.replace("%batch_num%", str(batch_number))
            path, shown = write_new_output_file(prefix, ".png", _png_writer(img), (img.width, img.height))
            subfolder = os.path.dirname(shown)
            results.append({"filename": path.name, "subfolder": subfolder, "type": "output"})
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
