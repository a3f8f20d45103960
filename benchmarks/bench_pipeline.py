"""Benchmark of the face pipeline: does the per-face crop path cost more than the whole-frame path?

    bash scripts/dev.sh python benchmarks/bench_pipeline.py [--resolution 128] [--steps 10] [--repeats 3]

A one-face portrait (../shared/data/photos/obama.jpg, at its own size) anonymized by DiffPrivacyAnonymize on the tiny
random checkpoint (CPU), at the same working resolution, through face crops (crop factor 3) and through the whole
frame (letterboxed), interleaved ``repeats`` times (a shared machine slows both alike); the receipt, the same dlib
measurement on both paths, is timed apart. Two face models (the toy recognizer with two detectors):

- ``toy``: dlib's HOG on the photo, and a free fixed box on any image of 256 px or less (the whole-frame path's
  working image): the whole-frame path's detection costs nothing, which no real detector does;
- ``dlib``: dlib's HOG on every image it is given, as a real face model detects wherever it is asked (the crop
  path on the photo, the whole-frame path on its working image).

Prints the best time of each path and their ratio from one run per face model, and the crop path's own work
(detection on the photo, cut, paste) as a fraction of a whole-frame run, with the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
    import comfy.cli_args
    import tiny_models
except ImportError as e:
    raise SystemExit(f"run through `bash scripts/dev.sh python benchmarks/bench_pipeline.py` ({e})")
import torch  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True
import comfy_test_pack  # noqa: E402,F401  (registers the tiny model type; after the CPU choice)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=128, help="working resolution of both paths")
    ap.add_argument("--steps", type=int, default=10, help="S (0.6 of it run)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--face-models", default="toy,dlib", help="comma-separated: toy, dlib (see the module doc)")
    args = ap.parse_args()

    import comfy.sd
    import diffprivacy.methods.receipt as receipt
    from diffprivacy.methods.pipeline import PipelineOptions
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyAnonymize
    from face_fixtures import dlib_model, load_photo
    from toy_models import PhotoToyFaceModel

    class DetectEverywhere(PhotoToyFaceModel):
        """The toy recognizer with dlib's HOG on every image, whatever its size."""

        def detect(self, image):
            return dlib_model().detect(image)

    photo = load_photo(REPO.parent / "shared" / "data" / "photos" / "obama.jpg", max_side=4000)[None]
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_models.tiny_checkpoint_path()),
                                                                 output_vae=True, output_clip=True)[:3]
        key_e = [[torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(f"stage {i}"))[0][0]
                             for i in range(10)]), {}]]
        uc = [clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]]
    faces = {"toy": PhotoToyFaceModel(), "dlib": DetectEverywhere()}
    faces = {name: faces[name] for name in args.face_models.split(",")}

    def run(face, mode):
        with torch.inference_mode():
            return DiffPrivacyAnonymize().anonymize(model, vae, face, photo, key_e, uc, 0, args.steps, 0.6, 0.4, 1,
                                                    1.0, 1.0, resolution=args.resolution,
                                                    pipeline=PipelineOptions(mode=mode))

    print(f"one-face portrait {photo.shape[2]}x{photo.shape[1]}, working resolution {args.resolution}, "
          f"S {args.steps}, the two paths interleaved {args.repeats} times (best of each); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    measure = receipt.measure_receipt
    receipt.measure_receipt = lambda *a, **k: receipt.unavailable_receipt("benchmark: receipt timed apart")
    for face in faces.values():
        run(face, "face crops")  # warm-up (model load, dlib)
    times = {(name, mode): [] for name in faces for mode in ("whole frame", "face crops")}
    for _ in range(args.repeats):  # interleaved: a busy machine slows all alike
        for name, mode in times:
            t0 = time.perf_counter()
            out = run(faces[name], mode)
            times[name, mode].append(time.perf_counter() - t0)
            assert out["result"][0].shape == photo.shape
    best = {key: min(t) for key, t in times.items()}
    for (name, mode), t in times.items():
        print(f"{name:<5} {mode:<12} best {best[name, mode]:8.3f} s  (all: {', '.join(f'{x:.2f}' for x in t)})",
              flush=True)
    for name in faces:
        print(f"{name:<5} ratio face crops / whole frame: "
              f"{best[name, 'face crops'] / best[name, 'whole frame']:.2f}", flush=True)
    receipt.measure_receipt = measure
    from diffprivacy.methods.pipeline import plan_photo
    from diffprivacy.methods.receipt import receipt_for
    face = next(iter(faces.values()))
    whole = min(best[name, "whole frame"] for name in faces)
    t0 = time.perf_counter()
    plan = plan_photo(photo[0], face, PipelineOptions(), args.resolution)
    delivered = plan.paste(photo[0], plan.cut(photo[0]))
    overhead = time.perf_counter() - t0
    t0 = time.perf_counter()
    receipt_for(photo[0], delivered, plan)
    spent = time.perf_counter() - t0
    print(f"the crop path's own work (detect on the photo, cut, paste): {overhead:.3f} s = "
          f"{overhead / whole:.3f} of a whole-frame run; the receipt (both paths): {spent:.3f} s; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
