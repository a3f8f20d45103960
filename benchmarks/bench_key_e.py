"""Benchmark of Key-E learning: steps/s and time-to-loss, reference loop vs the fast settings.

    bash scripts/dev.sh python benchmarks/bench_key_e.py            # CPU: tiny models
    bash scripts/dev.sh python benchmarks/bench_key_e.py --full     # full-size SD 1.5 shapes (GPU)

Both runs train the same image in the same process. "Reference" is the authors' loop (batch 1,
AdamW 1e-4 constant, fp32); "fast" draws several timesteps per step, uses a warm-up + cosine
schedule with a higher learning rate and (on a GPU) bf16 autocast. The loss compared is a
noise-free one: the mean epsilon-loss over 64 fixed (t, eps) draws with dropout off, evaluated
every few steps (evaluation time is not counted). Time-to-loss is the training time the fast
run needs to reach the reference run's final loss.
"""
from __future__ import annotations

import argparse
import time


def _host():
    try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
        import comfy.cli_args
    except ImportError as e:
        raise SystemExit(f"run through `bash scripts/dev.sh python benchmarks/bench_key_e.py` ({e})")
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def run(models, image, opts, eval_every, target=None):
    import torch
    from diffprivacy.guidance.autograd import gradients_enabled
    from diffprivacy.inversion.text_injection import PseudoTokenEncoder
    from diffprivacy.inversion.train_key_e import (KeyETrainingState, epsilon_loss, new_msi, prepare_training_image,
                                                   train_key_e)
    m, c, v, cv = models
    opts = opts.validated()
    enc = PseudoTokenEncoder(c)
    data = prepare_training_image(m, v, cv, image, opts)
    device = m.load_device
    g = torch.Generator().manual_seed(99)
    t_eval = torch.randint(0, 1000, (64,), generator=g).to(device)
    eps_eval = torch.randn((64,) + tuple(data.latents.shape[1:]), generator=g).to(device)
    with gradients_enabled():
        torch.manual_seed(opts.seed)
        state = KeyETrainingState(msi=new_msi(cv, enc, opts))
    clock = {"train": 0.0, "mark": None, "curve": [], "hit": None}

    def evaluate():
        with gradients_enabled(), torch.no_grad():
            was = state.msi.training
            state.msi.eval()
            d = type(data)(latents=data.latents.to(device), features=data.features.to(device))
            losses = [float(epsilon_loss(m.model, state.msi, enc, d, t_eval[i:i + 16],
                                         torch.zeros(16, dtype=torch.long, device=device), eps_eval[i:i + 16]))
                      for i in range(0, 64, 16)]
            state.msi.train(was)
        return sum(losses) / len(losses)

    def on_step(s):  # a guidance.progress.Step
        step, total = s.done, s.total
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        clock["train"] += now - clock["mark"]
        if step % eval_every == 0 or step == total:
            value = evaluate()
            clock["curve"].append((step, clock["train"], value))
            if target is not None and clock["hit"] is None and value <= target:
                clock["hit"] = (step, clock["train"])
        clock["mark"] = time.perf_counter()

    with torch.inference_mode():
        start = evaluate()
        clock["mark"] = time.perf_counter()
        train_key_e(m, c, v, cv, image, opts, state=state, progress=on_step)
    return start, clock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size SD 1.5 shapes (random weights), 512x512")
    ap.add_argument("--reference-steps", type=int, default=None, help="default: 6100 with --full, else 100")
    ap.add_argument("--fast-steps", type=int, default=None, help="default: a quarter of the reference steps")
    ap.add_argument("--fast-batch", type=int, default=8, help="timesteps per step of the fast run")
    ap.add_argument("--fast-lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=None)
    args = ap.parse_args()
    _host()
    import torch
    from diffprivacy.inversion.train_key_e import KeyETrainingOptions
    from key_e_tiny import load_tiny_models
    import tiny_models

    if args.full:
        import comfy.sd
        import comfy.clip_vision
        with torch.inference_mode():
            m, c, v = comfy.sd.load_checkpoint_guess_config(str(tiny_models.full_sd15_checkpoint_path()),
                                                             output_vae=True, output_clip=True)[:3]
            cv = comfy.clip_vision.load(str(tiny_models.tiny_clip_vision_path()))  # feature width only matters
        models, res = (m, c, v, cv), 512
    else:
        import comfy_test_pack  # noqa: F401
        from key_e_tiny import strengthen_cross_attention
        models = load_tiny_models(tiny_models.tiny_checkpoint_path(), tiny_models.tiny_clip_vision_path())
        strengthen_cross_attention(models[0], 30.0)
        res = 64
    ref_steps = args.reference_steps or (6100 if args.full else 100)
    fast_steps = args.fast_steps or max(1, ref_steps // 4)
    eval_every = args.eval_every or max(1, ref_steps // 30)
    image = torch.rand(1, res, res, 3, generator=torch.Generator().manual_seed(0))
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device: {device}; models: {'SD 1.5 full size' if args.full else 'tiny'}")

    ref = KeyETrainingOptions(steps=ref_steps, resolution=res)
    start, rc = run(models, image, ref, eval_every)
    target = rc["curve"][-1][2]
    print(f"reference: {ref_steps} steps in {rc['train']:.1f} s ({ref_steps / rc['train']:.2f} steps/s); "
          f"loss {start:.5f} -> {target:.5f}")
    fast = KeyETrainingOptions(steps=fast_steps, resolution=res, timesteps_per_step=args.fast_batch,
                               learning_rate=args.fast_lr, lr_schedule="cosine", warmup_steps=max(1, fast_steps // 20),
                               precision="bf16" if gpu else "fp32")
    _, fc = run(models, image, fast, max(1, eval_every // 4), target=target)
    print(f"fast (batch {args.fast_batch}, lr {args.fast_lr} cosine{', bf16' if gpu else ''}): {fast_steps} steps in "
          f"{fc['train']:.1f} s ({fast_steps / fc['train']:.2f} steps/s); final loss {fc['curve'][-1][2]:.5f}")
    if fc["hit"]:
        print(f"time to the reference's final loss: {fc['hit'][1]:.1f} s (step {fc['hit'][0]}) vs {rc['train']:.1f} s")
    else:
        print("the fast run did not reach the reference's final loss")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
