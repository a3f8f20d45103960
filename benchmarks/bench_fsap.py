"""Cost of one FSAP outer iteration against its budget, (1 + k) x (one UNet pass + one decoder backward).

    OMP_NUM_THREADS=2 bash scripts/dev.sh python benchmarks/bench_fsap.py [--size 512] [--k 6] [--mode batched]
    bash scripts/dev.sh python benchmarks/bench_fsap.py --tiny --size 64      # quick check on the tiny model

Full-size SD 1.5 shapes by default: the SD 1.5-layout checkpoint with random weights (tests/tiny_models.py), a
random FaceID file with the released shapes (tests/ip_adapter_fixtures.py), the real FaceNet-CASIA as the
recognizer of L_I and a real face photo (../shared). The unit is measured on the same patched model: one UNet
call on the inverted latent with the identity tokens requiring grad, the VAE decode, and the backward of the
decoded image to W. An iteration is timed from the search's own progress ticks (the last of N = 2 iterations,
tau = 2 so it never stops early). The ratio is iteration / ((1 + k) x unit). Random weights: the numbers are
timings only, never protection results. Runs on the GPU when there is one.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


SHARED = Path(__file__).resolve().parents[2] / "shared"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--mode", default="batched", choices=("batched", "sequential"))
    ap.add_argument("--tiny", action="store_true", help="the tiny test checkpoint instead of full-size shapes")
    ap.add_argument("--repeats", type=int, default=3, help="unit measurements (the median is used)")
    args = ap.parse_args()

    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.sd
    import comfy_test_pack  # noqa: F401  (registers the tiny model type)
    import ip_adapter_fixtures as fx
    import tiny_models
    from face_fixtures import casia_face_model, small_face_image
    from diffprivacy.methods import fsap
    from diffprivacy.guidance import ip_adapter as ipa
    from diffprivacy.guidance.autograd import gradients_enabled, thaw_inference_tensors
    from diffprivacy.guidance.vae_decode import make_vae_decoder
    from diffprivacy.inversion.ddim import ddim_invert

    path = tiny_models.tiny_checkpoint_path() if args.tiny else tiny_models.full_sd15_checkpoint_path()
    with torch.inference_mode():
        model, _, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)[:3]
        if args.tiny:
            import tempfile
            file = fx.write_adapter(Path(tempfile.mkdtemp()) / "ip-adapter-faceid_sd15.bin", "faceid",
                                    **fx.tiny_shape(model))
        else:
            file = fx.cached_sd15_file("faceid", "ip-adapter-faceid_sd15.bin")
        adapter = ipa.load_adapter(file)
    ctx_dim = adapter.spec.cross_dim
    cond = [[torch.randn(1, 77, ctx_dim, generator=torch.Generator().manual_seed(4)), {}]]
    photo = small_face_image(SHARED / "data" / "photos" / "obama.jpg", args.size)
    image = torch.from_numpy(np.array(photo)).float()[None] / 255.0
    w0 = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    face = casia_face_model()
    settings = fsap.FSAPSettings(tau=2.0, n=2, k=args.k, steps=20, perceptual_mode=args.mode)
    ticks = []

    def progress(step):  # one Step per iteration, at its end
        _sync()
        ticks.append((step.detail["iteration"], len(step.detail["history"]), time.perf_counter()))

    t0 = time.perf_counter()
    with torch.inference_mode():
        result = fsap.run_fsap(model, vae, cond, adapter, w0, image, face, settings, invert=ddim_invert,
                               progress=progress, render_final=True)
    total = time.perf_counter() - t0
    ends = {it: t for it, _, t in ticks}  # the last tick of an iteration is its end
    iteration = ends[2] - ends[1]

    # the unit: one UNet call with W requiring grad + decode + backward to W, batch 1, same patched model
    from diffprivacy.guidance import identity_streams as ids
    tokens = fsap.embedding_tokens(adapter)
    with torch.inference_mode():
        patched, ss = ids.apply_identity_streams(model, [ids.Stream("identity", adapter, tokens(w0),
                                                                    adapter.off_tokens())])
    import comfy.model_management as mm
    mm.load_models_gpu([patched])
    device = mm.get_torch_device()
    decode = make_vae_decoder(vae, patched)
    lat = args.size // 8
    units = []
    with gradients_enabled():
        thaw_inference_tensors(patched.model)
        ss.thaw()
        x = torch.randn(1, 4, lat, lat).to(device, patched.model.get_dtype())
        t = torch.full((1,), 500.0, device=device)
        c = cond[0][0].to(device, patched.model.get_dtype())
        for _ in range(args.repeats + 1):
            w = w0.clone().to(device).requires_grad_(True)
            _sync()
            s = time.perf_counter()
            ss.set_tokens("identity", on=tokens(w))
            to = dict(patched.model_options["transformer_options"])
            den = patched.model.apply_model(x, t, c_crossattn=c, transformer_options=to)
            img = decode(den)
            (g,) = torch.autograd.grad(img.float().mean(), [w])
            _sync()
            units.append(time.perf_counter() - s)
    unit = float(np.median(units[1:]))
    budget = (1 + args.k) * unit
    print(f"model {'tiny' if args.tiny else 'SD1.5-layout (random weights)'}, {args.size}x{args.size}, device "
          f"{device}, k {args.k}, perceptual mode {args.mode}, LPIPS absent (2 perceptual losses)")
    print(f"unit (UNet pass + decode + backward to W): {unit:.3f} s   budget (1 + k) x unit: {budget:.3f} s")
    print(f"one outer iteration (incl. FaceNet-CASIA forward/backward, losses): {iteration:.3f} s   "
          f"ratio {iteration / budget:.2f}")
    print(f"whole run (inversion, {len(result.history)} renders evaluated, final DDIM render): {total:.1f} s")
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
