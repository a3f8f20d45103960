"""Per-step cost of the guidance gradient (issue 17): full SD VAE vs tiny decoder vs tiny on the face window.

    bash scripts/dev.sh python benchmarks/bench_gradient.py [--sizes 256,512] [--batch 4] [--quick]

One guidance gradient step = decode x0_hat -> align the face -> real FaceNet-CASIA -> energy -> backward
(``IdentityGuidance.energy_and_grad``), on a real photo's MTCNN landmarks. Decoders have random weights in
their real layouts (ComfyUI's SD VAE class at SD 1.5 size; ComfyUI's TAESD class): their cost does not depend
on the values. Each configuration runs in its own process, so its peak RSS is its own; times are CPU seconds
of that process (``process_time``, all threads: steadier than wall time on shared cores; wall time shown too),
and the ratios come from this one run. The full VAE needs ~6 GiB per 512^2 sample for its backward pass, so
its batch-4 step is measured as four batch-1 steps (``--full-batch``: how many of the four actually run; the
rest are scaled from them). Memory with chunking is given two ways: the bytes autograd keeps for one backward
pass (what the chunk size divides) and the RSS the step added over a small warm-up. Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "photos" / "one-face-astronaut.png"

try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
    import comfy.cli_args
    import tiny_models  # noqa: F401
except ImportError as e:
    raise SystemExit(f"run through `bash scripts/dev.sh python benchmarks/bench_gradient.py` ({e})")
import torch  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True

PATHS = {  # name: (decoder, face window, channels_last)
    "full VAE, whole frame": ("full", False, False),
    "tiny, whole frame": ("tiny", False, False),
    "tiny, face window": ("tiny", True, False),
    "tiny, face window, channels_last": ("tiny", True, True),
}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _decoder(kind: str, tmp: Path):
    import comfy.latent_formats
    from diffprivacy.guidance import gradient_path as gp
    fmt = comfy.latent_formats.SD15()
    if kind == "tiny":
        from tiny_models import build_taesd_decoder
        return gp.load_tiny_decoder(build_taesd_decoder(tmp / "taesd_decoder.safetensors"), fmt)
    import comfy.ldm.models.autoencoder
    import comfy.sd
    from diffprivacy.guidance.vae_decode import make_vae_decoder
    from tiny_models import SD_VAE_CONFIG, random_init_
    kl = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    random_init_(kl, 2)
    vae = comfy.sd.VAE(sd=kl.state_dict())
    del kl
    return make_vae_decoder(vae, fmt)


def one(config: dict) -> dict:
    """Run one configuration in this process; returns its numbers."""
    import numpy as np
    from diffprivacy.guidance import gradient_path as gp
    from diffprivacy.guidance.energy import hide_energy
    from diffprivacy.guidance.guided_ddim import IdentityGuidance
    from face_fixtures import casia_face_model, small_face_image

    size, batch, steps = config["size"], config["batch"], config["steps"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = _decoder(config["decoder"], Path(tmp))
    face_model = casia_face_model()
    image = torch.from_numpy(np.array(small_face_image(PHOTO, size))).float() / 255.0
    if config["channels_last"]:
        gp.apply_flags(decoder, gp.GradientOptions(channels_last=True))
        gp.to_channels_last(face_model.recognizer, "the face recognizer")
    # L_is: a per-sample energy, so a batch-4 step costs four batch-1 steps (and the full VAE can be split)
    guidance = IdentityGuidance.from_image(face_model, decoder, image, hide_energy(), chunk=config["chunk"],
                                           window_margin=gp.WINDOW_MARGIN if config["window"] else None)
    per_call = config.get("per_call", batch)
    z = torch.randn(per_call, 4, size // 8, size // 8)
    window_frac = 1.0
    if config["window"]:
        lms = guidance.landmarks_for(z.new_empty((1, 0, size, size)))
        rec = face_model.recognizer
        windows = gp.face_windows(lms, rec.template(), rec.crop_size, (size // 8, size // 8))
        m, side = gp.WINDOW_MARGIN, size // 8
        window_frac = sum((min(side, y1 + m) - max(0, y0 - m)) * (min(side, x1 + m) - max(0, x0 - m))
                          for (y0, y1, x0, x1), _ in windows) / side ** 2
    # Warm-up (lazy initialisation) on a small latent, so that its own peak stays below the step's: the peak RSS
    # is a high-water mark, and a full-size one-sample warm-up would already reach a chunked step's peak.
    guidance.energy_and_grad(z[:1] if config["window"] else z[:1, :, :8, :8])
    base_rss = _rss_gib()
    cpu, wall = [], []
    saved = {"now": 0, "max": 0}   # bytes autograd keeps for one backward pass (weights excluded)

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved["now"] += t.numel() * t.element_size()
            saved["max"] = max(saved["max"], saved["now"])
        return t
    real_grad = torch.autograd.grad

    def grad(*args, **kwargs):
        try:
            return real_grad(*args, **kwargs)
        finally:
            saved["now"] = 0
    torch.autograd.grad = grad
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            guidance.energy_and_grad(z)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    torch.autograd.grad = real_grad
    scale = batch / per_call
    return {"cpu_s": min(cpu) * scale, "wall_s": min(wall) * scale, "peak_rss_gib": _rss_gib(),
            "step_rss_gib": _rss_gib() - base_rss, "saved_gib": saved["max"] / 2**30, "window_frac": window_frac,
            "scaled": scale != 1}


def _spawn(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True,
                         env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"configuration {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--full-batch", type=int, default=1, help="batch-1 steps of the full VAE actually run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one step each: checks the script runs")
    ap.add_argument("--memory-only", action="store_true", help="only the chunking memory table")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    sizes = [128] if args.quick else [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; batch {args.batch}; "
          f"FaceNet-CASIA (real) on {PHOTO.name}", flush=True)
    rows = []
    for size in [] if args.memory_only else sizes:
        full = None
        for name, (decoder, window, cl) in PATHS.items():
            config = {"size": size, "batch": args.batch, "steps": 1 if decoder == "full" or args.quick else 2,
                      "decoder": decoder, "window": window, "channels_last": cl, "chunk": args.batch}  # all at once
            if decoder == "full":
                config.update(per_call=max(1, min(args.full_batch, args.batch)))
            r = _spawn(config)
            full = full or r["cpu_s"]
            rows.append((size, name, r, full / r["cpu_s"]))
            print(f"  {size}^2 {name}: {r}", flush=True)
    size = sizes[-1]
    memory = []
    for chunk in (0, 2, 1):
        r = _spawn({"size": size, "batch": args.batch, "steps": 1, "decoder": "tiny", "window": False,
                    "channels_last": False, "chunk": chunk or args.batch})  # batch: all at once
        memory.append((chunk, r))
        print(f"  memory {size}^2 tiny chunk {chunk}: {r}", flush=True)

    print("\n| size | gradient path | CPU s per step (wall) | × cheaper than full VAE | decoded pixels | peak RSS |")
    print("|---|---|---|---|---|---|")
    for size, name, r, ratio in rows:
        note = " (4 × batch 1)" if r["scaled"] else ""
        print(f"| {size}² | {name} | {r['cpu_s']:.1f}{note} ({r['wall_s']:.1f}) | ×{ratio:.1f} | "
              f"{r['window_frac']:.0%} | {r['peak_rss_gib']:.2f} GiB |")
    print(f"\n| tiny decoder, {size}², batch {args.batch} | autograd keeps for one backward | × less | "
          "RSS the step added (peak RSS) | × less |")
    print("|---|---|---|---|---|")
    base, base_saved = memory[0][1]["step_rss_gib"], memory[0][1]["saved_gib"]
    for chunk, r in memory:
        label = "unchunked" if chunk == 0 else f"gradient_chunk {chunk}"
        rss_ratio = base / max(r["step_rss_gib"], 1e-3)
        print(f"| {label} | {r['saved_gib']:.2f} GiB | ×{base_saved / max(r['saved_gib'], 1e-6):.1f} | "
              f"{r['step_rss_gib']:.2f} GiB ({r['peak_rss_gib']:.2f} GiB) | ×{rss_ratio:.1f} |")


if __name__ == "__main__":
    main()
