"""Hide faces from detectors over folders of photos, then measure the result as saved (thesis ch. 3).

    bash scripts/dev.sh python scripts/hide_from_detectors.py --input ../shared/data/faces-13id \
        ../shared/data/photos --out /tmp/hide --evaluate --transfer dlib-hog,dlib-cnn --cnn-limit 10

Writes ``<out>/<photo>.png`` (the protected photo, 8-bit PNG) and ``<out>/report.json``: per photo the
faces, which were private, iterations, time, distortion (L2, ALD_inf, SSIM), and with ``--evaluate`` the
verdict of every detector on the PNG read back (the attacked ones, and black-box dlib HOG / dlib CNN /
SCRFD-onnxruntime), plus blur and mosaic tuned per photo until the first detector misses the same private
faces, with their distortion; a summary pools hiding rate, kept rate and R = r_p + 0.5 r_a.

``--private alternate`` hides faces 0, 2, 4... (largest first) and keeps the others: with group photos it
measures both claims at once (private faces hidden, kept faces still found). ``--survival`` adds the first
detector's verdict after a re-upload (JPEG q75 / q95, rescale x0.9 / x1.1): what the ``--robust`` attack is for.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffprivacy.evaluation.baselines import apply_baseline
from diffprivacy.evaluation.detection import (REUPLOADS, after_reupload, detection_outcome, distortion, summarize,
                                             transfer_detectors)
from diffprivacy.evaluation.images import list_images, load_image, save_image
from diffprivacy.methods.detector_hiding import HideSettings, hide_from_detectors, load_attack_targets

BLUR_STEPS = (2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0)      # sigma, % of face width
MOSAIC_STEPS = (4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 50.0)              # tile spacing, % of face width


def tuned_baseline(image, boxes, method, steps, detect, private_boxes, kept_boxes):
    """The weakest strength of ``method`` at which ``detect`` misses every private face (None if none does)."""
    for s in steps:
        out, _ = apply_baseline(image, boxes, method, s, margin=0.2)
        out = (out * 255).round() / 255
        o = detection_outcome(detect, out, private_boxes, kept_boxes)
        if all(o["private_hidden"]):
            return {"strength": s, **distortion(image, out)}
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="folders of photos")
    ap.add_argument("--out", required=True)
    ap.add_argument("--detectors", default="mtcnn",
                    help="attacked detectors, comma-separated (mtcnn,retinaface,scrfd,blazeface-short,blazeface-full); "
                         "the first one decides which faces there are")
    ap.add_argument("--private", default="all", choices=["all", "largest", "alternate"])
    ap.add_argument("--range", type=float, default=HideSettings.max_range, help="R_p, 0-255 scale")
    ap.add_argument("--epsilon", type=float, default=HideSettings.epsilon)
    ap.add_argument("--iterations", type=int, default=HideSettings.iterations)
    ap.add_argument("--robust", action="store_true")
    ap.add_argument("--step", default=HideSettings.step, choices=["ssim", "sign"],
                    help="ssim: the SSIM-shaped step (default); sign: the thesis's FGSM step")
    ap.add_argument("--polish", type=int, default=HideSettings.polish,
                    help="iterations after every face is gone spent lowering SSIM's loss (0: none, as before "
                         "issue 28's polish)")
    ap.add_argument("--region", type=float, default=HideSettings.region,
                    help="change only pixels within this many times each private face's box (0: anywhere)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many photos per folder (0: all)")
    ap.add_argument("--max-side", type=int, default=0, help="downscale photos to this longest side first (0: no)")
    ap.add_argument("--evaluate", action="store_true", help="measure the saved PNGs (and tuned blur / mosaic)")
    ap.add_argument("--transfer", default="dlib-hog",
                    help="detectors measured besides the attacked ones: dlib-hog,dlib-cnn,scrfd-ort,mtcnn,"
                         "blazeface-short,blazeface-full (an attacked one is measured anyway)")
    ap.add_argument("--no-baselines", action="store_true", help="with --evaluate: skip tuning blur and mosaic")
    ap.add_argument("--cnn-limit", type=int, default=0, help="run dlib-cnn on the first N photos only (slow)")
    ap.add_argument("--survival", action="store_true",
                    help="also run the first detector after JPEG q75 / q95 and rescaling x0.9 / x1.1 of the PNG")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import comfy.cli_args   # the attack checks ComfyUI's Cancel; as ComfyUI's --cpu, it must not look for a GPU
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = load_attack_targets(args.detectors.split(","))
    settings = HideSettings(epsilon=args.epsilon, max_range=args.range, iterations=args.iterations, robust=args.robust,
                            region=args.region, step=args.step, polish=args.polish)
    attacked = {t.name for t in targets}
    transfer = transfer_detectors([t for t in args.transfer.split(",") if t and t not in attacked]) \
        if args.evaluate else {}
    rows = []
    for folder in args.input:
        files = list(list_images(folder).items())
        files = files[:args.limit] if args.limit else files
        for name, path in files:
            image = load_image(path)
            if args.max_side and max(image.shape[:2]) > args.max_side:
                from diffprivacy.evaluation.images import match_size
                s = args.max_side / max(image.shape[:2])
                image = match_size(image, torch.zeros(round(image.shape[0] * s), round(image.shape[1] * s), 3))
            image = (image * 255).round() / 255
            ref_faces = targets[0].detect(image)
            indices = list(range(0, len(ref_faces), 2)) if args.private == "alternate" else ()
            t0 = time.perf_counter()
            r = hide_from_detectors(image, targets, "indices" if args.private == "alternate" else args.private,
                                    indices, settings=settings)
            seconds = time.perf_counter() - t0
            dst = out / f"{Path(folder).name}-{Path(name).stem}.png"
            save_image(r.image, dst)
            row = {"photo": f"{Path(folder).name}/{name}", "size": list(image.shape[:2]), "faces": len(r.faces),
                   "private": r.private, "kept": r.kept, "iterations": r.iterations,
                   "iterations_to_hide": r.iterations_to_hide, "seconds": round(seconds, 2), "note": r.note}
            if args.evaluate and r.private:
                saved = load_image(dst)                          # as saved: the PNG read back
                row["distortion"] = distortion(image, saved)
                pb = torch.stack([r.faces[i].box for i in r.private])
                kb = torch.stack([r.faces[i].box for i in r.kept]) if r.kept else torch.zeros(0, 4)
                dets = {t.name: t.detect for t in targets}
                if args.survival:
                    for label, (scale, quality) in REUPLOADS.items():
                        dets[f"{targets[0].name} after {label}"] = after_reupload(targets[0].detect, scale, quality)
                for tname, fn in transfer.items():
                    if tname == "dlib-cnn" and args.cnn_limit and len(rows) >= args.cnn_limit:
                        continue
                    dets[tname] = fn
                row["detectors"] = {}
                for dname, fn in dets.items():
                    before = detection_outcome(fn, image, pb, kb)
                    after = detection_outcome(fn, saved, pb, kb)
                    # a transfer detector that never saw a face on the original says nothing about hiding it
                    was_found = [not b for b in before["private_hidden"]]
                    row["detectors"][dname] = {
                        "private_hidden": [h for h, f in zip(after["private_hidden"], was_found) if f],
                        "kept_found": [k for k, b in zip(after["kept_found"], before["kept_found"]) if b],
                        "found_on_original": was_found}
                first = targets[0].detect
                if not args.no_baselines:
                    boxes = [f.box for f in r.faces]
                    row["blur"] = tuned_baseline(image, boxes, "blur", BLUR_STEPS, first, pb, kb)
                    row["mosaic"] = tuned_baseline(image, boxes, "mosaic", MOSAIC_STEPS, first, pb, kb)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    if args.evaluate:
        names = sorted({d for r in rows for d in r.get("detectors", {})})
        summary = {d: summarize([r for r in rows if "detectors" in r], d) for d in names}
        for key in ("distortion", "blur", "mosaic"):
            vals = [r[key] for r in rows if r.get(key)]
            if vals:
                summary[key] = {m: sum(v[m] for v in vals) / len(vals) for m in ("l2", "ald_inf", "ssim")}
                summary[key]["photos"] = len(vals)
        summary["blur_or_mosaic_never_hid"] = sum(1 for r in rows if "blur" in r and r["blur"] is None)
    secs = [r["seconds"] for r in rows if r["private"]]
    summary["mean_seconds"] = sum(secs) / len(secs) if secs else None
    summary["settings"] = vars(args)
    (out / "report.json").write_text(json.dumps({"summary": summary, "photos": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
