"""Time to hide the faces of a 512x512 photo from MTCNN at default settings (R_p 12, eps 0.5, <= 200 iterations).

    OMP_NUM_THREADS=2 bash scripts/dev.sh python benchmarks/bench_hide_detectors.py [--photo P] [--range 3]

Prints wall time, iterations run, the iteration at which every private face was gone (or that it never was),
and seconds per iteration. The photo defaults to ../shared/data/photos/one-face-astronaut.png (512x512); any
other photo is resized to 512 on its longest side. All faces of the photo are hidden in one pass.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffprivacy.evaluation.images import load_image, match_size
from diffprivacy.methods.detector_hiding import HideSettings, hide_from_detectors, load_attack_targets

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "one-face-astronaut.png"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photo", default=str(DEFAULT))
    ap.add_argument("--detectors", default="mtcnn")
    ap.add_argument("--range", type=float, default=HideSettings.max_range)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    img = load_image(args.photo)
    if max(img.shape[:2]) != 512:
        s = 512 / max(img.shape[:2])
        img = match_size(img, torch.zeros(round(img.shape[0] * s), round(img.shape[1] * s), 3))
    targets = load_attack_targets(args.detectors.split(","))
    targets[0].detect(img)  # warm-up
    t0 = time.perf_counter()
    settings = HideSettings(max_range=args.range, epsilon=min(HideSettings.epsilon, args.range))
    r = hide_from_detectors(img, targets, "all", settings=settings)
    dt = time.perf_counter() - t0
    print(f"{Path(args.photo).name} {tuple(img.shape[:2])}, {len(r.faces)} face(s), detectors {args.detectors}, "
          f"R_p {args.range}: {dt:.1f} s, {r.iterations} iterations ({dt / max(r.iterations, 1):.2f} s each), "
          f"iterations to hide: {r.iterations_to_hide if r.iterations_to_hide else 'not hidden'}; {r.hidden}")


if __name__ == "__main__":
    main()
