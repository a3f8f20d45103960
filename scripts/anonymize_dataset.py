#!/usr/bin/env python3
"""Anonymize a face dataset with any method of the pack, resumably, on this machine or a Ray cluster.

  bash scripts/dev.sh python scripts/anonymize_dataset.py --method blur --input faces/ --output out/ --keys keys/
  bash scripts/dev.sh python scripts/anonymize_dataset.py --method diff-privacy-anonymize \\
      --checkpoint models/checkpoints/v1-5-pruned-emaonly.safetensors --models ~/ComfyUI/models \\
      --input faces/ --output out/ --keys keys/ --password-env DP_KEY_PASSWORD --set steps=50 --set strength=0.6

The diffusion methods protect each chosen face in a square crop and paste it back: every output is its photo's size,
the pixels outside the faces' masks the input's (--set mode="whole frame", crop_factor, feather, mask_grow, faces:
the face pipeline's settings). The output folder gets the same relative paths (as PNG) and manifest.jsonl (per
image: method, parameters, seed, output and key names, status, error, the output's receipt, where the photo was
cut). Keys go to --keys (a diffusion key records the crops, so Recover returns the whole photo), sealed with the
password in the environment variable --password-env names (never on the command line). A rerun skips finished images
and redoes cut ones; the command replaces or deletes only files its manifest proves it wrote. With Ray installed,
images are spread over one actor per GPU (CPU actors without a GPU, --actors of them); --address (or RAY_ADDRESS)
joins a cluster, whose nodes must read the same model folders (--models) and have this pack on the same path; this
process reads every input and writes every output, so only this machine needs the folders. The engine is
methods/dataset.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from diffprivacy.methods import dataset
from diffprivacy.methods.dataset import COMMON, Method, Protected, Setting
from diffprivacy.methods.dataset_methods import METHODS as DIFFUSION_METHODS


def _baseline(kind: str):
    def make(settings: dict):
        from diffprivacy.evaluation.baselines import cover_faces
        face_model = dataset.load_face_model(settings["face_model"], settings["detect_size"])

        def protect(image, seed: int) -> Protected:
            out, mask = cover_faces(face_model, image[None], kind, settings["strength"], settings["margin"],
                                    settings["faces"], "error", seed)
            return Protected(out[0], info={"faces_covered": bool(mask.any())})
        return protect
    return make


def _baseline_settings(strength: Setting) -> dict:
    return {**COMMON, "face_model": Setting(str, "dlib", help=COMMON["face_model"].help), "strength": strength,
            "margin": Setting(float, 0.2, 0.0, 2.0, help="the face box grown by this fraction on every side"),
            "faces": Setting(str, "all", choices=("all", "largest"))}


# Strength units (evaluation/baselines.py): blur sigma and mosaic cell in % of the face width, pixelate blocks
# across the face; the low ends keep a visible change on a face of 100 pixels.
METHODS = {
    **DIFFUSION_METHODS,
    "blur": Method("blur", _baseline("blur"), _baseline_settings(
        Setting(float, 10.0, 1.0, 100.0, help="Gaussian sigma in % of the face width"))),
    "pixelate": Method("pixelate", _baseline("pixelate"), _baseline_settings(
        Setting(float, 6.0, 1.0, 50.0, help="blocks across the face"))),
    "mosaic": Method("mosaic", _baseline("mosaic"), _baseline_settings(
        Setting(float, 16.0, 2.0, 100.0, help="tile spacing in % of the face width"))),
}


def run(method: str, *args, **kwargs) -> dict:
    """:func:`diffprivacy.methods.dataset.run` with this command's methods."""
    return dataset.run(method, *args, methods=METHODS, **kwargs)


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes name=value, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, help=f"one of: {', '.join(sorted(METHODS))}")
    ap.add_argument("--input", required=True, help="folder of images (sub-folders and folder links included)")
    ap.add_argument("--output", required=True, help="folder for the protected images and manifest.jsonl")
    ap.add_argument("--keys", required=True, help="folder for key files (keep it private; outside --output)")
    ap.add_argument("--checkpoint", help="SD 1.5 checkpoint file, for the diffusion methods")
    ap.add_argument("--models", help="a ComfyUI models folder to read face models and adapters from")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a method setting (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it and its path")
    ap.add_argument("--password-env", default="", help="environment variable holding the key password")
    ap.add_argument("--ray", dest="ray", action="store_true", default=None, help="use Ray (default: when installed)")
    ap.add_argument("--no-ray", dest="ray", action="store_false", help="run in this process")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""), help="Ray cluster address")
    ap.add_argument("--actors", type=int, default=2, help="CPU actors when there is no GPU")
    ap.add_argument("--retries", type=int, default=dataset.RETRIES,
                    help="times an image is sent again after its worker died on it (then it is an error)")
    ap.add_argument("--retry-errors", action="store_true", help="redo images whose last attempt failed")
    ap.add_argument("--max-megapixels", type=float, default=dataset.MAX_MEGAPIXELS,
                    help="larger images are refused before decoding (decompression bombs)")
    ap.add_argument("--max-file-mb", type=float, default=dataset.MAX_FILE_MB, help="larger files are not read")
    args = ap.parse_args(argv)
    try:
        settings = parse_settings(args.set)
        for name in ("checkpoint", "models"):
            if getattr(args, name):
                settings[name] = os.path.abspath(getattr(args, name))
        summary = run(args.method, args.input, args.output, args.keys, settings, seed=args.seed, use_ray=args.ray,
                      address=args.address, actors=args.actors, password_env=args.password_env,
                      retry_errors=args.retry_errors, retries=args.retries, max_megapixels=args.max_megapixels,
                      max_file_mb=args.max_file_mb, log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
