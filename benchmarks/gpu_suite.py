"""The GPU benchmark suite of issue 17 (run it through ``bash benchmarks/gpu_suite.sh``).

Full-size SD 1.5-layout checkpoint (random weights, tests/tiny_models.py; built once, cached), 512², the real
FaceNet-CASIA with MTCNN landmarks on a real photo (../shared), loaded the host's default way
(``load_checkpoint_guess_config`` + ComfyUI's model management: whatever VRAM state and dtypes it picks). Rows:
anonymize (4 outputs, 30 of 50 steps), hide (80 of 100), each with the gradient decoded by the full VAE, the tiny
decoder (a random-weight file in ComfyUI's TAESD layout: same cost as the real one) and the tiny decoder on the face
window, with bf16 autocast off and on; Key-I and recovery (50 steps); DIFP (benchmarks/bench_difp.py, when the DIFP
module exists); Key-E learning to the reference loop's loss (benchmarks/bench_key_e.py). Each: time, ratio to
unguided sampling of the same length, peak GPU memory. Then the host-default check: the x0 and through-UNet gradient
paths run a few steps and must give finite latents. Last, issue 29: the gradient paths twice with the host's default
model loading and, where the host has the switch (ComfyUI 0.38), with ``--disable-dynamic-vram``: reloads from disk
(the resident copies the pack makes, once per loaded model) and peak memory (benchmarks/bench_dynamic_vram.py).

``--dry``: the tiny checkpoint at 64², few steps, on whatever device there is: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "photos" / "obama.jpg"

try:  # scripts/dev.sh puts the host, the pack (as diffprivacy) and tests/ on PYTHONPATH
    import comfy.cli_args
    import tiny_models  # noqa: F401
except ImportError as e:
    raise SystemExit(f"run through `bash benchmarks/gpu_suite.sh` ({e})")
import torch  # noqa: E402

GPU = torch.cuda.is_available()
if not GPU:
    comfy.cli_args.args.cpu = True

VARIANTS = (("full VAE", False), ("tiny", False), ("tiny", True))  # (gradient decoder, face window)


def _sync():
    if GPU:
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds, peak GPU GiB or None) of ``fn()``."""
    _sync()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    dt = time.perf_counter() - t0
    return out, dt, (torch.cuda.max_memory_allocated() / 2**30 if GPU else None)


def _gib(x):
    return "—" if x is None else f"{x:.1f} GiB"


def _models(dry: bool):
    import comfy.sd
    if dry:
        import comfy_test_pack  # noqa: F401  (registers the tiny model type)
    path = tiny_models.tiny_checkpoint_path() if dry else tiny_models.full_sd15_checkpoint_path()
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        key_e = [[torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(f"stage {i}"))[0][0]
                             for i in range(10)]), {}]]
        uc = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, clip, vae, key_e, uc


def _tiny_decoder_folder(tmp: Path) -> None:
    """A random-weight taesd_decoder in ComfyUI's layout, in a vae_approx folder of its own (cost = the real one's)."""
    import folder_paths
    from tiny_models import build_taesd_decoder
    folder = tmp / "vae_approx"
    folder.mkdir()
    build_taesd_decoder(folder / "taesd_decoder.safetensors")
    folder_paths.folder_names_and_paths["vae_approx"] = ([str(folder)], {".safetensors", ".pth"})
    folder_paths.filename_list_cache.pop("vae_approx", None)


def _face_and_image(size: int, device):
    import numpy as np
    from diffprivacy.guidance.face import loader
    from face_fixtures import small_face_image
    if not PHOTO.exists():
        raise SystemExit(f"{PHOTO} is missing: the suite uses the real photos in ../shared beside the clone")
    face = loader.load_face_model("mtcnn", "facenet-casia", "auto", device)
    image = torch.from_numpy(np.array(small_face_image(PHOTO, size))).float()[None] / 255
    return face, image


def protection_rows(model, vae, face, image, key_e, uc, args, rows):
    from diffprivacy.methods import diff_privacy
    from diffprivacy.guidance.ddim import denoising_step_count
    from diffprivacy.guidance.gradient_path import GradientOptions
    from diffprivacy.inversion.key_e import KeyE
    from diffprivacy.inversion.ddim import make_key_i, recover

    ke = KeyE.from_conditioning(key_e)
    sa, sh, sk = args.anonymize_steps, args.hide_steps, args.key_steps
    na, nh = denoising_step_count(sa, 0.6), denoising_step_count(sh, 0.8)
    faces = diff_privacy.FaceChoice("largest")

    def anonymize(scale, options=None):
        return lambda: diff_privacy.anonymize(model, vae, face, image, ke.schedule(uc[0], 0.4), seed=0, steps=sa,
                                              strength=0.6, num_outputs=4, guidance_scale=scale, faces=faces,
                                              gradient=options)

    def hide(scale, options=None):
        return lambda: diff_privacy.hide(model, vae, face, image, ke.schedule(uc[0], 0.6), seed=0, steps=sh,
                                         strength=0.8, lambda_above=scale, lambda_below=scale, faces=faces,
                                         gradient=options)

    with torch.inference_mode():
        diff_privacy.anonymize(model, vae, face, image, ke.schedule(uc[0], 0.4), seed=0, steps=2, strength=1.0,
                               num_outputs=4, faces=faces)  # warm-up: loading, first detection, allocator
        for label, run, n in ((f"anonymize, 4 outputs, {na} of {sa} steps", anonymize, na),
                              (f"hide, 1 output, {nh} of {sh} steps", hide, nh)):
            _, base, mem = timed(run(0.0))
            rows.append((label, "unguided", "—", f"{base:.2f} s", "×1.00", _gib(mem)))
            for decoder, window in VARIANTS:
                for precision in ("fp32", "bf16"):
                    options = GradientOptions(decoder=decoder, face_window=window, precision=precision)
                    _, dt, mem = timed(run(1.0, options))
                    rows.append((label, decoder + (", face window" if window else ""), precision, f"{dt:.2f} s",
                                 f"×{dt / base:.2f}", _gib(mem)))
                    print("  ", rows[-1], flush=True)
        latent = vae.encode(image)
        key_i, dt, mem = timed(lambda: make_key_i(model, ke, latent, sk))
        rows.append((f"Key-I, {sk} steps", "—", "—", f"{dt:.2f} s", "—", _gib(mem)))
        _, dt, mem = timed(lambda: recover(model, ke, key_i, sk))
        rows.append((f"recovery, {sk} steps", "—", "—", f"{dt:.2f} s", "—", _gib(mem)))


def host_default_check(model, vae, face, image, key_e, uc, dry: bool) -> str:
    """Issue 16 part 3: both gradient paths, a few steps each, on the host's default model loading."""
    import comfy.sample
    from diffprivacy.methods import diff_privacy
    from diffprivacy.guidance.ddim import ddim_sigmas
    from diffprivacy.guidance.sampling import sample_with_comfy
    from diffprivacy.inversion.key_e import KeyE

    schedule = KeyE.from_conditioning(key_e).schedule(uc[0], 0.4)
    sigmas = ddim_sigmas(diff_privacy.model_sampling(model), *((10, 0.4) if dry else (50, 0.1)))  # 4-5 steps
    results = []
    with torch.inference_mode():
        latent = vae.encode(image)
        for through_unet in (False, True):
            sampler = diff_privacy.guided_sampler(model, vae, face, image, "anonymize", 0.4, 1.0, 1.0,
                                                  through_unet=through_unet)
            try:
                out = sample_with_comfy(model, sampler, sigmas, schedule, latent, comfy.sample.prepare_noise(latent, 0),
                                        0)
                ok = bool(torch.isfinite(out).all())
                results.append(f"{'through UNet' if through_unet else 'x0'}: {'ok' if ok else 'NON-FINITE'}")
            except Exception as e:  # report, do not hide: this is what the check is for
                results.append(f"{'through UNet' if through_unet else 'x0'}: FAILED ({type(e).__name__}: {e})")
    import comfy.model_management as mm
    return f"host default loading ({mm.vram_state.name}, {len(sigmas) - 1} steps each): " + "; ".join(results)


def _sub(script: str, extra: list[str], timeout: int) -> str:
    try:
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *extra], capture_output=True,
                             text=True, timeout=timeout)
        return out.stdout + (f"\n(exit {out.returncode}: {out.stderr[-800:]})" if out.returncode else "")
    except subprocess.TimeoutExpired as e:
        return (e.stdout or "") + f"\n(stopped after {timeout} s)" if isinstance(e.stdout, str) else \
            f"(stopped after {timeout} s)"


def key_e_row(args, rows, notes):
    extra = ["--reference-steps", str(args.key_e_reference_steps)] + ([] if args.dry else ["--full"])
    out = _sub("bench_key_e.py", extra, args.key_e_timeout)
    notes.append("Key-E learning (benchmarks/bench_key_e.py " + " ".join(extra) + "):\n" + out.strip())
    ref = re.search(r"reference: (\d+) steps in ([\d.]+) s", out)
    hit = re.search(r"time to the reference's final loss: ([\d.]+) s", out)
    if ref:
        rows.append((f"Key-E learning to the {ref.group(1)}-step reference loss", "fast settings", "bf16" if GPU else
                     "fp32", f"{hit.group(1)} s" if hit else "not reached",
                     f"reference loop {float(ref.group(2)):.1f} s", "—"))


def difp_row(args, rows, notes):
    if not (REPO / "guidance" / "difp.py").exists() or not (REPO / "benchmarks" / "bench_difp.py").exists():
        rows.append(("DIFP step", "—", "—", "skipped: no DIFP module yet", "—", "—"))
        return
    extra = ["--tiny", "--repeats", "1"] if args.dry else ["--repeats", "3"]
    out = _sub("bench_difp.py", extra, args.difp_timeout)
    notes.append("DIFP (benchmarks/bench_difp.py " + " ".join(extra) + "):\n" + out.strip())
    rows.append(("DIFP step (one UNet call of its 3 entries + ILVR)", "—", "—", "see below", "see below", "—"))


def dynamic_vram_rows(args, rows, notes):
    """Issue 29: the gradient paths twice each (benchmarks/bench_dynamic_vram.py, one process per loading) with the
    host's default model loading, then with --disable-dynamic-vram where the host has that switch (ComfyUI 0.38):
    reloads from disk over both runs (1 per part that has a reload recipe is right; 2 would be a reload per run) and
    the peak GPU memory of each path."""
    import comfy.cli_args
    modes = [("host default loading", [])]
    if hasattr(comfy.cli_args, "enables_dynamic_vram"):
        modes.append(("--disable-dynamic-vram", ["--disable-dynamic-vram"]))
    else:
        notes.append("dynamic VRAM: this ComfyUI has none (no --disable-dynamic-vram switch): the gradient paths ran "
                     "with its one loading")
    for label, extra in modes:
        extra = extra + ([] if args.dry else ["--full"])
        out = _sub("bench_dynamic_vram.py", extra, args.dynamic_vram_timeout)
        found = re.search(r"^RESULT (\{.*\})$", out, re.M)
        if not found:
            rows.append((f"gradient paths twice, {label}", "—", "—", "FAILED: see below", "—", "—"))
            notes.append("bench_dynamic_vram.py " + " ".join(extra) + ":\n" + out.strip()[-2000:])
            continue
        r = json.loads(found.group(1))
        with_recipe = [k for k, v in r["reload_recipe"].items() if v]
        reloads = ", ".join(f"{k} {r['reloads'][k]}" for k in with_recipe) or "none (no part has a reload recipe)"
        notes.append(f"gradient paths, {label} (ComfyUI {r['host']}): {r['loading']}; dynamic patchers: "
                     f"{', '.join(k for k, v in r['dynamic'].items() if v) or 'none'}; reloads from disk over two "
                     f"runs: {reloads}")
        for path in dict.fromkeys(run["path"] for run in r["runs"]):
            runs = [run for run in r["runs"] if run["path"] == path]
            peaks = [run["peak_gib"] for run in runs if run["peak_gib"] is not None]
            results = sorted({run["result"] for run in runs})
            rows.append((f"{path}, twice: {label}", r["loading"], "—",
                         " / ".join(f"{run['seconds']:.2f} s" for run in runs) + ("" if results == ["ok"] else
                                                                                 f" ({'; '.join(results)})"),
                         f"reloads: {reloads}", _gib(max(peaks) if peaks else None)))
            print("  ", rows[-1], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny checkpoint, 64², few steps: checks the script only")
    ap.add_argument("--out", type=Path, default=None, help="the Markdown file (default benchmarks/results/...)")
    ap.add_argument("--skip", default="", help="comma-separated: protection, key-e, difp, host-check, dynamic-vram")
    ap.add_argument("--key-e-reference-steps", type=int, default=None,
                    help="steps of the reference loop whose loss the fast settings must reach (default 1500 on a "
                         "GPU, to fit 8 minutes; the paper's loop is 6100: pass 6100 to measure that goal)")
    ap.add_argument("--key-e-timeout", type=int, default=300)
    ap.add_argument("--difp-timeout", type=int, default=120)
    ap.add_argument("--dynamic-vram-timeout", type=int, default=240, help="per loading mode")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.anonymize_steps, args.hide_steps, args.key_steps = (8, 10, 5) if args.dry else (50, 100, 50)
    args.key_e_reference_steps = args.key_e_reference_steps or (4 if args.dry else 1500)
    size = 64 if args.dry else 512

    device_name = torch.cuda.get_device_name() if GPU else "CPU (no GPU)"
    date = datetime.date.today().isoformat()
    print(f"{date}, {device_name}, torch {torch.__version__}, {'DRY RUN: ' if args.dry else ''}{size}²", flush=True)
    t0 = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_decoder_folder(Path(tmp))
        model, clip, vae, key_e, uc = _models(args.dry)
        face, image = _face_and_image(size, model.load_device)
        if "protection" not in skip:
            protection_rows(model, vae, face, image, key_e, uc, args, rows)
        if "host-check" not in skip:
            notes.append(host_default_check(model, vae, face, image, key_e, uc, args.dry))
            print("  ", notes[-1], flush=True)
        del model, clip, vae
        if GPU:
            torch.cuda.empty_cache()
        if "difp" not in skip:
            difp_row(args, rows, notes)
        if "key-e" not in skip:
            key_e_row(args, rows, notes)
        if "dynamic-vram" not in skip:
            dynamic_vram_rows(args, rows, notes)
    total = time.perf_counter() - t0

    lines = [f"GPU suite, {date}, {device_name}, torch {torch.__version__}, SD 1.5-layout "
             f"{'tiny (dry run: not a measurement)' if args.dry else 'full size'}, {size}², total {total:.0f} s",
             "", "| run | gradient decoder | gradient precision | time | ratio to unguided | peak GPU memory |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {n}" if "\n" not in n else f"```\n{n}\n```" for n in notes]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"gpu-suite-{date}-{slug}{'-dry' if args.dry else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
