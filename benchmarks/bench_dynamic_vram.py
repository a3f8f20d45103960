"""The gradient paths on the host's default model loading, or with ``--disable-dynamic-vram`` (issue 29).

    bash scripts/dev.sh python benchmarks/bench_dynamic_vram.py [--disable-dynamic-vram] [--full]

One loading mode per process (ComfyUI decides dynamic VRAM at start-up; benchmarks/gpu_suite.py runs both). ComfyUI
0.38 turns dynamic VRAM on in ``main.py``, which a library import does not run: this script does what ``main.py``
does (``enables_dynamic_vram()``, comfy-aimdo's ``init`` / ``init_devices``, ``CoreModelPatcher =
ModelPatcherDynamic``), and says so, or why not, in its result. The checkpoint (tiny, or with ``--full`` the
full-size SD 1.5-layout one) and the tiny CLIP-vision model are loaded by ComfyUI's Load Checkpoint and Load CLIP
Vision nodes; every reload recipe
(``cached_patcher_init``) is wrapped to count the reloads from disk. Then each gradient path runs twice:

* Apply Identity Streams + one back-propagation through the UNet (the MODEL's resident copy),
* the full-VAE gradient decoder, one back-propagation (the VAE's),
* Key-E learning, 2 steps (MODEL, CLIP and the CLIP-vision features).

Output: one line ``RESULT {json}``: the host, the loading, which parts have a reload recipe, the reloads per part
over both runs (1 each is right: the pack makes its resident copy once per loaded model) and, per path, the time
and peak GPU memory of each run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def enable_dynamic_vram(disable: bool) -> str:
    """The loading this process gets, set up as ComfyUI's main.py does; returns it in words."""
    import comfy.cli_args as cli
    if not hasattr(cli, "enables_dynamic_vram"):
        return "no dynamic VRAM on this host"
    cli.args.disable_dynamic_vram = bool(disable)
    if not cli.enables_dynamic_vram():
        return "dynamic VRAM off (--disable-dynamic-vram)" if disable else "dynamic VRAM off (the host's flags)"
    try:
        import comfy_aimdo.control as control
    except ImportError:
        return "dynamic VRAM off (comfy-aimdo is not installed)"
    try:
        control.init()
        import comfy.memory_management
        import comfy.model_management as mm
        import comfy.model_patcher as mp
        if not control.init_devices((d.index, 0) for d in mm.get_all_torch_devices()):
            return "dynamic VRAM off (comfy-aimdo could not take the GPU)"
        mp.CoreModelPatcher = mp.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    except Exception as e:  # an API that moved since this was written: say so and measure the host as it is
        return f"dynamic VRAM not enabled here ({type(e).__name__}: {e})"
    return "dynamic VRAM on"


def count_reloads(patcher, part: str, reloads: dict) -> bool:
    """Wrap ``patcher``'s reload recipe so every reload from disk counts in ``reloads[part]``; False if it has none."""
    init = getattr(patcher, "cached_patcher_init", None)
    reloads.setdefault(part, 0)
    if init is None:
        return False
    factory = init[0]

    def counted(*args, **kwargs):
        reloads[part] += 1
        return factory(*args, **kwargs)
    patcher.cached_patcher_init = (counted, *init[1:])
    return True


def load_as_the_core_loaders_do(checkpoint: Path, clip_vision: Path):
    """(MODEL, CLIP, VAE, CLIP_VISION) from ComfyUI's Load Checkpoint and Load CLIP Vision nodes (on 0.38 these set
    the reload recipes, or do not, exactly as in a user's workflow), run as the server runs a node."""
    import torch
    import folder_paths
    import nodes
    folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent))
    folder_paths.add_model_folder_path("clip_vision", str(clip_vision.parent))
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint.name)[:3]
        (cv,) = nodes.CLIPVisionLoader().load_clip(clip_vision.name)
    return model, clip, vae, cv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disable-dynamic-vram", action="store_true", help="load as ComfyUI does with that switch")
    ap.add_argument("--full", action="store_true", help="the full-size SD 1.5-layout checkpoint, 512x512")
    args = ap.parse_args()
    try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
        import comfy.cli_args
    except ImportError as e:
        raise SystemExit(f"run through `bash scripts/dev.sh python benchmarks/bench_dynamic_vram.py` ({e})")
    loading = enable_dynamic_vram(args.disable_dynamic_vram)
    import torch
    gpu = torch.cuda.is_available()
    if not gpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy_test_pack  # noqa: F401  (registers the tiny model type)
    import tiny_models
    import ip_adapter_fixtures as fx
    from diffprivacy.guidance import ip_adapter as ipa
    from diffprivacy.guidance import identity_streams as ids
    from diffprivacy.guidance.autograd import gradients_enabled, thaw_inference_tensors
    from diffprivacy.guidance.vae_decode import make_vae_decoder
    from diffprivacy.inversion.train_key_e import KeyETrainingOptions, train_key_e
    try:
        from comfyui_version import __version__ as host_version
    except ImportError:
        host_version = "?"

    path = tiny_models.full_sd15_checkpoint_path() if args.full else tiny_models.tiny_checkpoint_path()
    size = 512 if args.full else 64
    device = mm.get_torch_device()
    model, clip, vae, cv = load_as_the_core_loaders_do(path, tiny_models.tiny_clip_vision_path())
    reloads: dict = {}
    parts = {"model": model, "clip": clip.patcher, "vae": vae.patcher, "clip_vision": cv.patcher}
    recipes = {part: count_reloads(p, part, reloads) for part, p in parts.items()}  # before any clone copies them
    dynamic = {part: bool(getattr(p, "is_dynamic", lambda: False)()) for part, p in parts.items()}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        file = fx.write_adapter(Path(tmp) / "ip-adapter-faceid_sd15.bin", "faceid", **fx.tiny_shape(model))
        adapter = ipa.load_adapter(file)
    g = torch.Generator().manual_seed(0)
    embedding = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1)
    image = torch.rand(1, size, size, 3, generator=g)
    context_dim = ids.cross_attention_layers(model)[0].context_dim

    def streams_backward():
        with torch.inference_mode():
            on, off = ids.identity_tokens(adapter, embedding)
            patched, stream_set = ids.apply_identity_streams(model, [ids.Stream("identity", adapter, on, off, 1.0)])
            mm.load_models_gpu([patched], force_full_load=True)
            with gradients_enabled():
                thaw_inference_tensors(patched.model)  # as the methods do: loaded under inference mode, values kept
                stream_set.thaw()
                x = torch.randn(1, 4, size // 8, size // 8, device=device, requires_grad=True)
                ctx = torch.randn(1, 77, context_dim, device=device)
                out = patched.model.apply_model(x, torch.full((1,), 500.0, device=device), c_crossattn=ctx,
                                                transformer_options=patched.model_options["transformer_options"])
                out.float().square().mean().backward()
                return bool(torch.isfinite(x.grad).all())

    def vae_backward():
        with torch.inference_mode():
            decoder = make_vae_decoder(vae, model)
            with gradients_enabled():
                z = torch.randn(1, 4, size // 8, size // 8, device=device, requires_grad=True)
                decoder(z).square().mean().backward()
                return bool(torch.isfinite(z.grad).all())

    def key_e_steps():
        with torch.inference_mode():
            opts = KeyETrainingOptions(steps=2, resolution=size, timesteps_per_step=1, seed=1)
            return bool(torch.isfinite(train_key_e(model, clip, vae, cv, image, opts)[1]).all())

    runs = []
    paths = (("identity streams + UNet backward", streams_backward), ("full-VAE gradient decoder", vae_backward),
             ("Key-E learning, 2 steps", key_e_steps))
    for name, fn in paths:
        for i in (1, 2):
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                ok = "ok" if fn() else "NON-FINITE"
            except Exception as e:  # report, do not hide: this is what the check is for
                ok = f"FAILED ({type(e).__name__}: {str(e)[:200]})"
            if gpu:
                torch.cuda.synchronize()
            runs.append({"path": name, "run": i, "result": ok, "seconds": round(time.perf_counter() - t0, 2),
                         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None})
            print("  ", runs[-1], flush=True)
    result = {"host": host_version, "loading": loading, "dynamic": dynamic, "reload_recipe": recipes,
              "reloads": reloads, "runs": runs}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
