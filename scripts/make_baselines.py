#!/usr/bin/env python3
"""Blurred, pixelated and mosaicked copies of a folder (faces found by dlib's HOG detector),
one sub-folder per method and strength: OUT/blur-strong/img1.png, ...

  bash scripts/dev.sh python scripts/make_baselines.py --input ../shared/data/faces-13id --out /tmp/baselines \
      [--methods blur,pixelate,mosaic] [--levels weak,medium,strong] [--margin 0.2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="blur,pixelate,mosaic")
    ap.add_argument("--levels", default="weak,medium,strong", help="names from evaluation.baselines.PRESETS")
    ap.add_argument("--margin", type=float, default=0.2, help="grow each face box by this fraction per side")
    args = ap.parse_args(argv)
    from diffprivacy.evaluation.baselines import PRESETS, apply_baseline
    from diffprivacy.evaluation.images import list_images, load_image, save_image
    from diffprivacy.guidance.face.dlib_face import load_dlib_face_model

    model = load_dlib_face_model()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    for m in methods:
        for lv in levels:
            if lv not in PRESETS.get(m, {}):
                ap.error(f"unknown method/level {m}/{lv}; presets: {PRESETS}")
    files = list_images(args.input)
    try:
        from tqdm import tqdm
        files_iter = tqdm(files.items(), unit="image")
    except ImportError:
        files_iter = files.items()
    for name, path in files_iter:
        try:
            img = load_image(path)
        except ValueError as e:
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
        boxes = [f.box for f in model.detect(img)]
        if not boxes:
            print(f"{name}: no face detected, copied unchanged", file=sys.stderr)
        for m in methods:
            for lv in levels:
                out, _ = apply_baseline(img, boxes, m, PRESETS[m][lv], margin=args.margin)
                d = Path(args.out) / f"{m}-{lv}"
                d.mkdir(parents=True, exist_ok=True)
                save_image(out, d / (Path(name).stem + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
