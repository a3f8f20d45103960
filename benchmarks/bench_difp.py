"""Cost of one DIFP step against one unguided UNet pass at 512x512, full-size SD 1.5 shapes, and of realism control.

    OMP_NUM_THREADS=2 bash scripts/dev.sh python benchmarks/bench_difp.py [--size 512] [--repeats 3]

The model is the full-size SD 1.5-layout checkpoint with random weights (tests/tiny_models.py); the adapters are
random-weight files with the released shapes (tests/ip_adapter_fixtures.py): FaceID as the identity stream and
IP-Adapter (4 tokens) as the style stream, on all 16 cross-attention layers. One DIFP step = one UNet call on the
batch of three entries (∅,∅), (id,∅), (∅,sty) selected by the stream switches (what the DIFP guider sends through
``calc_cond_batch``), the Eq. 10 combination and the DDIM step. One unguided pass = the unpatched UNet on a batch of
one. Realism control = one ILVR application (latent space, g_rea 0.6) on the step's latent. The issue's bounds:
DIFP step <= 3.2x one unguided pass; ILVR < 2 % of a DIFP step. Runs on the GPU when there is one.
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
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead (a smoke test, not a result)")
    args = ap.parse_args()

    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import ip_adapter_fixtures as fx
    import tiny_models
    from diffprivacy.methods import difp
    from diffprivacy.guidance import identity_streams as ids
    from diffprivacy.guidance import ip_adapter as ipa
    from diffprivacy.guidance.ddim import ddim_step
    from diffprivacy.guidance.ilvr import RealismControl

    with torch.inference_mode():
        if args.tiny:
            import comfy_test_pack  # noqa: F401
            path = tiny_models.tiny_checkpoint_path()
        else:
            path = tiny_models.full_sd15_checkpoint_path()
        model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
        if args.tiny:
            shape = fx.tiny_shape(model)
            face = ipa.adapter_from_state_dict(fx.flat(fx.adapter_state_dict("faceid", **shape, dtype=torch.float32)))
            style = ipa.adapter_from_state_dict(fx.flat(fx.adapter_state_dict("ip-adapter", **shape, clip_embed=32,
                                                                              dtype=torch.float32)))
        else:
            face = ipa.load_adapter(fx.cached_sd15_file("faceid", "ip-adapter-faceid_sd15.bin"))
            style = ipa.load_adapter(fx.cached_sd15_file("ip-adapter", "ip-adapter_sd15.safetensors"))
        g = torch.Generator().manual_seed(0)
        on, off = ids.identity_tokens(face, torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1))
        s_on = style.tokens(torch.randn(1, style.spec.clip_dim, generator=g))
        patched, _ = ids.apply_identity_streams(model, [ids.Stream("identity", face, on, off),
                                                        ids.Stream("style", style, s_on, style.off_tokens())])
        mm.load_models_gpu([model])
        device, dtype = mm.get_torch_device(), model.model.get_dtype()
        for p in (face, style):
            p.to(device)
        lat = args.size // 8
        ctx_dim = ids.cross_attention_layers(model)[0].context_dim
        x1 = torch.randn(1, 4, lat, lat, generator=g).to(device)
        ctx = torch.randn(1, 77, ctx_dim, generator=g).to(device)
        sigma = torch.full((1,), 5.0, device=device)
        realism = RealismControl(torch.randn(1, 4, lat, lat, generator=g).to(device), 0.6)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def plain_pass():
            sync()
            t0 = time.perf_counter()
            model.model.apply_model(x1, sigma, c_crossattn=ctx, transformer_options=dict(
                model.model_options["transformer_options"], cond_or_uncond=[0]))
            sync()
            return time.perf_counter() - t0

        def difp_step():
            sync()
            t0 = time.perf_counter()
            mo = ids.with_stream_switches(patched.model_options, {0: (), 1: ("identity",), 2: ("style",)})
            to = dict(mo["transformer_options"], cond_or_uncond=[0, 1, 2])
            out = patched.model.apply_model(x1.expand(3, -1, -1, -1), sigma.expand(3),
                                            c_crossattn=ctx.expand(3, -1, -1), transformer_options=to)
            denoised = difp.dual_cfg(out[0:1], out[1:2], out[2:3], 1.0, 1.0)
            nxt = ddim_step(x1, denoised, sigma[0], sigma[0] * 0.9)
            sync()
            return time.perf_counter() - t0, nxt

        def ilvr(x):
            sync()
            t0 = time.perf_counter()
            realism(x, 4.5, 0, 10)
            sync()
            return time.perf_counter() - t0

        plain_pass(), difp_step()  # warm-up
        plain, steps, lp = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
            plain.append(plain_pass())
            t, nxt = difp_step()
            steps.append(t)
            lp.append(ilvr(nxt))
    a, b, c = statistics.median(plain), statistics.median(steps), statistics.median(lp)
    what = "TINY test model (smoke test, not a result)" if args.tiny else "full-size SD 1.5 shapes, random weights"
    print(f"{what}; device {device} ({dtype}), {args.size}x{args.size}, {args.repeats} repeats")
    print(f"unguided UNet pass (batch 1): {a:.3f} s (runs {', '.join(f'{v:.3f}' for v in plain)})")
    print(f"DIFP step (3 entries in one batched call + Eq. 10 + DDIM): {b:.3f} s (runs "
          f"{', '.join(f'{v:.3f}' for v in steps)})")
    print(f"ratio of medians {b / a:.3f}, of minima {min(steps) / min(plain):.3f} (bound 3.2)")
    print(f"ILVR (latent, g_rea 0.6): {c * 1000:.2f} ms = {100 * c / b:.2f} % of a DIFP step (bound 2 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
