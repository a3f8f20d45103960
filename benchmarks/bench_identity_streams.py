"""Cost of the identity + style streams on a UNet step: patched / unpatched time at 512x512, full-size SD 1.5 shapes.

    OMP_NUM_THREADS=2 bash scripts/dev.sh python benchmarks/bench_identity_streams.py [--size 512] [--repeats 3]

The model is the full-size SD 1.5-layout checkpoint with random weights (tests/tiny_models.py) and the adapters are
random-weight files with the released shapes (tests/ip_adapter_fixtures.py): FaceID (4 tokens) as the identity
stream and IP-Adapter Plus (16 tokens) as the style stream, both on all 16 cross-attention layers. One step = one
UNet call on a CFG batch of 2 (positive with the streams on, negative with the zero-embedding tokens), as KSampler
makes it. Runs on the GPU when there is one. The issue's bound: at most +10 %.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import ip_adapter_fixtures as fx
    import tiny_models
    from diffprivacy.guidance import identity_streams as ids
    from diffprivacy.guidance import ip_adapter as ipa

    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_models.full_sd15_checkpoint_path()), output_vae=False,
                                                      output_clip=False)[0]
        face = ipa.load_adapter(fx.cached_sd15_file("faceid", "ip-adapter-faceid_sd15.bin"))
        plus = ipa.load_adapter(fx.cached_sd15_file("ip-adapter-plus", "ip-adapter-plus_sd15.safetensors"))
        g = torch.Generator().manual_seed(0)
        on, off = ids.identity_tokens(face, torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1))
        s_on = plus.tokens(clip_states=torch.randn(1, 257, 1280, generator=g))
        s_off = plus.tokens(clip_states=torch.zeros(1, 257, 1280))
        patched, _ = ids.apply_identity_streams(model, [ids.Stream("identity", face, on, off),
                                                        ids.Stream("style", plus, s_on, s_off)])
        mm.load_models_gpu([model])
        device, dtype = mm.get_torch_device(), model.model.get_dtype()
        for p in (face, plus):
            p.to(device)
        lat = args.size // 8
        x = torch.randn(2, 4, lat, lat, generator=g).to(device)
        t = torch.full((2,), 5.0, device=device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device)

        def step(m):
            to = dict(m.model_options["transformer_options"], cond_or_uncond=[0, 1])
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.model.apply_model(x, t, c_crossattn=ctx, transformer_options=to)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        step(model), step(patched)  # warm-up (allocations, kernels, the streams' K/V cache)
        plain, streams = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            plain.append(step(model))
            streams.append(step(patched))
    a, b = statistics.median(plain), statistics.median(streams)
    print(f"device {device} ({dtype}), {args.size}x{args.size}, CFG batch 2, {args.repeats} repeats")
    print(f"unpatched UNet step: {a:.3f} s (runs {', '.join(f'{v:.3f}' for v in plain)})")
    print(f"with identity + style streams: {b:.3f} s (runs {', '.join(f'{v:.3f}' for v in streams)})")
    print(f"ratio of medians {b / a:.3f}, of minima {min(streams) / min(plain):.3f} (bound 1.10; on shared CPU "
          f"cores only runs far apart from each other's noise mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
