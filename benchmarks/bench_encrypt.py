"""Benchmark of Stage II/III: anonymize (batch 4), hide, Key-I + recovery, against unguided DDIM.

    bash scripts/dev.sh python benchmarks/bench_encrypt.py [--full] [--size 512] [--face toy|facenet]
        [--anonymize-steps 50] [--hide-steps 100] [--key-steps 50]

Tiny random checkpoint on CPU by default; --full uses the SD 1.5-layout random checkpoint (run it
on a GPU). Prints wall time, peak memory and the ratio to unguided DDIM of the same length
(lambda = 0 skips the decode/recognizer/backward work entirely, so it is plain DDIM).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
    import comfy.cli_args
    import tiny_models  # noqa: F401
except ImportError as e:
    raise SystemExit(f"run through `bash scripts/dev.sh python benchmarks/bench_encrypt.py` ({e})")
import torch  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True


def _peak():
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process max)"


def _timed(label, fn, baseline=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ratio = f"  x{dt / baseline:.2f} of unguided" if baseline else ""
    print(f"{label:<34} {dt:8.2f} s  peak {_peak()}{ratio}", flush=True)
    return out, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="SD 1.5-layout checkpoint (GPU)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 512 full, 128 tiny)")
    ap.add_argument("--face", default="toy", choices=("toy", "facenet"))
    ap.add_argument("--anonymize-steps", type=int, default=50, help="S for anonymization (paper 50; 0.6 of it run)")
    ap.add_argument("--hide-steps", type=int, default=100, help="S for hiding (paper 100; 0.8 of it run)")
    ap.add_argument("--key-steps", type=int, default=50, help="S for Key-I and recovery (paper 50)")
    args = ap.parse_args()

    import comfy.sd
    import comfy_test_pack  # noqa: F401
    import tiny_models
    from face_fixtures import small_face_image
    from toy_models import ToyFaceModel
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyAnonymize, DiffPrivacyHide
    from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI, DiffPrivacyRecover

    path = tiny_models.full_sd15_checkpoint_path() if args.full else tiny_models.tiny_checkpoint_path()
    size = args.size or (512 if args.full else 128)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        key_e = [[torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(f"stage {i}"))[0][0]
                             for i in range(10)]), {}]]
        uc = [clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]]
    if args.face == "facenet":
        from diffprivacy.guidance.face import loader
        device = model.load_device
        face = loader.load_face_model("mtcnn", "facenet-casia", "auto", device)
        import numpy as np
        photo = small_face_image(REPO.parent / "shared/data/photos/obama.jpg", size)  # face-centred crop
        image = torch.from_numpy(np.array(photo)).float()[None] / 255
    else:
        face = ToyFaceModel()
        ramp = torch.linspace(0, 0.5, size)[None, :, None, None].expand(1, size, size, 3)
        image = torch.rand(1, 1, 1, 3) * 0.5 + ramp
    kind = "SD1.5-layout" if args.full else "tiny"
    print(f"model {kind}, {size}x{size}, device {model.load_device}, face {args.face}")

    from diffprivacy.guidance.ddim import denoising_step_count
    from diffprivacy.methods.pipeline import PipelineOptions
    whole = PipelineOptions(mode="whole frame")  # the toy face fills the frame; the crop path: bench_pipeline.py
    sa, sh, sk = args.anonymize_steps, args.hide_steps, args.key_steps
    na, nh = denoising_step_count(sa, 0.6), denoising_step_count(sh, 0.8)
    with torch.inference_mode():
        def anon(lam):
            return lambda: DiffPrivacyAnonymize().anonymize(model, vae, face, image, key_e, uc, 0, sa, 0.6, 0.4, 4,
                                                            lam, 1.0, resolution=size, pipeline=whole)

        def hide(lam):
            return lambda: DiffPrivacyHide().hide(model, vae, face, image, key_e, uc, 0, sh, 0.8, 0.6, 1, lam, lam,
                                            resolution=size, pipeline=whole)
        # warm-up, untimed: model loading, the face model's first detection and embedding, allocator
        DiffPrivacyAnonymize().anonymize(model, vae, face, image, key_e, uc, 0, 2, 1.0, 0.4, 4, 1.0, 1.0,
                                         resolution=size, pipeline=whole)
        _, base = _timed(f"unguided DDIM, batch 4, {na} steps", anon(0.0))
        _timed(f"anonymize, batch 4, {na} of {sa} steps", anon(1.0), base)
        _, base = _timed(f"unguided DDIM, batch 1, {nh} steps", hide(0.0))
        _timed(f"hide, batch 1, {nh} of {sh} steps", hide(1.5), base)
        (key_i,), _ = _timed(f"Key-I (inversion, {sk} steps)",
                             lambda: DiffPrivacyMakeKeyI().make_key_i(model, key_e, vae, image, sk, resolution=size))
        _timed(f"recovery ({sk} steps)", lambda: DiffPrivacyRecover().recover(model, key_e, key_i, sk))

if __name__ == "__main__":
    main()
