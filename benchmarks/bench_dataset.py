"""Dataset-command throughput with 1 and 2 local Ray CPU actors, and the ratio, from one run of this script.

  bash scripts/dev.sh python benchmarks/bench_dataset.py [--method blur] [--images 360] [--detect-size 1600]

Real photos (faces-13id, cycled under new names up to --images), a baseline method by default (dlib detection at
the given size: cheap enough for CPUs; a diffusion method's per-image cost only brings the ratio closer to the actor
count). Each configuration starts from an empty output folder and is timed as a user sees it: Ray's start and each
actor's model loading included. The start (Ray, and the first actor ready) is printed as a share of the run: the
ratio measures the actors, not the start, only when that share is small (under 10 %).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import anonymize_dataset as cli


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="blur")
    ap.add_argument("--images", type=int, default=360)
    ap.add_argument("--detect-size", default="1600")
    ap.add_argument("--input", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/faces-13id"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    photos = sorted(Path(args.input).glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i in range(args.images):
            shutil.copy(photos[i % len(photos)], src / f"{i:04d}-{photos[i % len(photos)].name}")
        rates, load = {}, os.getloadavg()[0]
        for actors in (1, 2):
            start = time.monotonic()
            s = cli.run(args.method, src, Path(tmp) / f"out{actors}", Path(tmp) / f"keys{actors}",
                        {"detect_size": args.detect_size}, use_ray=True, actors=actors, progress=False,
                        log=lambda m: None)
            seconds = time.monotonic() - start
            rates[actors] = s["ran"] / seconds
            print(f"{actors} actor(s): {s['ran']} images {s['status']} in {seconds:.1f} s = {rates[actors]:.3f} "
                  f"images/s; start {s['startup_s']:.1f} s = {100 * s['startup_s'] / seconds:.1f} % of the run")
        print(f"ratio 2/1: {rates[2] / rates[1]:.2f} (cores: {os.cpu_count()}, load average {load:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after)")


if __name__ == "__main__":
    main()
