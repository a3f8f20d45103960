"""Dataset-command throughput: images/s with 1 and 2 local Ray CPU actors, and the ratio.

  bash scripts/dev.sh python benchmarks/bench_dataset.py [--method blur] [--images 8]

Real photos (faces-13id), a baseline method by default (dlib detection at 640 px: cheap enough for CPUs; a
diffusion method's per-image cost only makes the ratio closer to the actor count). Each run starts from an empty
output folder; the time includes Ray's start and each actor's model loading, as a user sees it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import dataset_runner as dr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="blur")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--input", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/faces-13id"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for p in sorted(Path(args.input).glob("*.jpg"))[:args.images]:
            shutil.copy(p, src / p.name)
        rates = {}
        for actors in (1, 2):
            out = Path(tmp) / f"out{actors}"
            start = time.monotonic()
            summary = dr.run(args.method, src, out, Path(tmp) / f"keys{actors}", {"detect_size": "640"},
                             use_ray=True, actors=actors, progress=False, log=lambda m: None)
            seconds = time.monotonic() - start
            rates[actors] = summary["ran"] / seconds
            print(f"{actors} actor(s): {summary['ran']} images in {seconds:.1f} s = {rates[actors]:.3f} images/s")
        print(f"ratio 2/1: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
