"""Benchmark of the face pipeline: does the per-face crop path cost more than the whole-frame path?

    bash scripts/dev.sh python benchmarks/bench_pipeline.py [--resolution 128] [--steps 10] [--repeats 3]

A one-face portrait (../shared/data/photos/obama.jpg, at its own size) anonymized by DiffPrivacyAnonymize on the tiny
random checkpoint (CPU), at the same working resolution, once through face crops (crop factor 3) and once through
the whole frame (letterboxed), both with the receipt off (it is the same dlib measurement for both) and with it on.
Prints the best of ``repeats`` wall times of each, and their ratios, from one run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
    import comfy.cli_args
    import comfy_test_pack  # noqa: F401  (registers the tiny model type)
    import tiny_models
except ImportError as e:
    raise SystemExit(f"run through `bash scripts/dev.sh python benchmarks/bench_pipeline.py` ({e})")
import torch  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=128, help="working resolution of both paths")
    ap.add_argument("--steps", type=int, default=10, help="S (0.6 of it run)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import comfy.sd
    import diffprivacy.methods.receipt as receipt
    from diffprivacy.methods.pipeline import PipelineOptions
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyAnonymize
    from face_fixtures import load_photo
    from toy_models import PhotoToyFaceModel

    photo = load_photo(REPO.parent / "shared" / "data" / "photos" / "obama.jpg", max_side=4000)[None]
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_models.tiny_checkpoint_path()),
                                                                 output_vae=True, output_clip=True)[:3]
        key_e = [[torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(f"stage {i}"))[0][0]
                             for i in range(10)]), {}]]
        uc = [clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]]
    face = PhotoToyFaceModel()
    measure = receipt.measure_receipt

    def run(mode):
        with torch.inference_mode():
            return DiffPrivacyAnonymize().anonymize(model, vae, face, photo, key_e, uc, 0, args.steps, 0.6, 0.4, 1,
                                                    1.0, 1.0, resolution=args.resolution,
                                                    pipeline=PipelineOptions(mode=mode))

    def best(mode):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = run(mode)
            times.append(time.perf_counter() - t0)
        return min(times), out

    print(f"one-face portrait {photo.shape[2]}x{photo.shape[1]}, working resolution {args.resolution}, "
          f"S {args.steps}, best of {args.repeats}", flush=True)
    run("face crops")  # warm-up (model load, dlib)
    results = {}
    for with_receipt in (False, True):
        if not with_receipt:
            receipt.measure_receipt = lambda *a, **k: receipt.unavailable_receipt("benchmark: receipt off")
        else:
            receipt.measure_receipt = measure
        for mode in ("whole frame", "face crops"):
            dt, out = best(mode)
            results[(mode, with_receipt)] = dt
            assert out["result"][0].shape == photo.shape
            print(f"{mode:<12} receipt {'on ' if with_receipt else 'off'} {dt:8.3f} s", flush=True)
        ratio = results[("face crops", with_receipt)] / results[("whole frame", with_receipt)]
        print(f"ratio face crops / whole frame (receipt {'on' if with_receipt else 'off'}): {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
