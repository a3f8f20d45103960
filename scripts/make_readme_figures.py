#!/usr/bin/env python3
"""The README's result figures, made from real runs on real photos with real face models (no diffusion model
is involved: images from random-weight checkpoints are never shown as results).

  bash scripts/dev.sh python scripts/make_readme_figures.py [--photo PHOTO] [--faces FOLDER] [--out docs/images]

- hiding.jpg: what protection does to a face: the photo, the same photo hidden from MTCNN by the pack's node at
  its defaults (DiffPrivacyHideFromDetectors, real MTCNN weights, judged on the saved PNG read back), the
  perturbation made visible, the node's receipt (the line it shows after the run), and blur and mosaic each
  tuned to the weakest strength that hides the face from MTCNN too, with every panel's SSIM. Under a minute;
- baselines.jpg: a photo (default ../shared/data/photos/one-face-astronaut.png, NASA, public domain) with its
  face blurred, pixelated and mosaicked by the pack's baselines (evaluation/baselines.py, their weak and
  strong presets), each captioned with dlib's verdict: the L2 distance of the covered face to the original's
  at dlib's threshold 0.6, or "no face found";
- evaluation-blur.jpg: the evaluation report's plots (evaluation/report.py, what scripts/evaluate.py writes)
  for strong blur over a folder of real faces (default ../shared/data/faces-13id, 61 photos of 13 people),
  with dlib: the distance histogram against the threshold and the t-SNE of the embeddings. A few minutes on
  two CPU cores.

Each JPEG is kept under 150 KB.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MAX_BYTES = 150_000


def save_jpeg(image, path: Path, max_width: int) -> None:
    """A PIL image as a JPEG of at most ``max_width`` pixels across and MAX_BYTES bytes."""
    from PIL import Image
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    for quality in (88, 82, 76, 70, 62, 55):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
        if buf.tell() <= MAX_BYTES:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    print(f"wrote {path} ({buf.tell() // 1024} KB, {image.width}x{image.height})")


def baselines_figure(photo: Path, out: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    from diffprivacy.evaluation.analysis import analyse_face
    from diffprivacy.evaluation.baselines import PRESETS, apply_baseline
    from diffprivacy.evaluation.identity import identity_distance
    from diffprivacy.evaluation.images import load_image
    from diffprivacy.evaluation.plots import figure_to_image
    from diffprivacy.guidance.face.dlib_face import load_dlib_face_model
    from PIL import Image

    model = load_dlib_face_model()
    image = load_image(photo)
    original = analyse_face(model, image)
    if original.embedding is None:
        raise SystemExit(f"{photo}: dlib finds no face in it; choose another --photo")
    boxes = [f.box for f in model.detect(image)]
    x1, y1, x2, y2 = (float(v) for v in original.boxes[0])
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, 1.4 * max(x2 - x1, y2 - y1)
    crop = [int(max(0, cy - half)), int(min(image.shape[0], cy + half)),
            int(max(0, cx - half)), int(min(image.shape[1], cx + half))]
    panels = [("original", image, "")]
    for level in ("weak", "strong"):
        for method, title in (("blur", "Gaussian blur"), ("pixelate", "pixelation"), ("mosaic", "mosaic")):
            covered, _ = apply_baseline(image, boxes, method, PRESETS[method][level])
            covered = covered.clamp(0, 1)
            found = analyse_face(model, covered)
            if found.embedding is None:
                verdict = "dlib: no face found"
            else:
                d = identity_distance(model, original.embedding, found.embedding)
                verdict = f"dlib L2 {d:.2f}: " + ("not matched" if d >= model.threshold else "still matched")
            panels.append((f"{title} ({level})", covered, verdict))
        if level == "weak":
            panels.append(None)  # below the original
    fig = Figure(figsize=(12.8, 7.4), dpi=100)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(2, 4, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if panel is None:
            ax.axis("off")
            ax.text(0.5, 0.5, f"dlib's recognizer\n(no guidance sees it)\nsame person iff L2 < {model.threshold:.1f}",
                    ha="center", va="center", fontsize=12, transform=ax.transAxes)
            continue
        title, img, caption = panel
        ax.imshow(np.clip(img[crop[0]:crop[1], crop[2]:crop[3]].numpy(), 0, 1))
        ax.set_title(title, fontsize=12)
        ax.set_xlabel(caption, fontsize=11)
    fig.tight_layout()
    pixels = (figure_to_image(fig)[0].numpy() * 255).round().astype("uint8")
    save_jpeg(Image.fromarray(pixels), out, 1280)


def hiding_figure(photo: Path, out: Path, max_side: int = 768) -> str:
    """The hiding.jpg figure; returns the node's receipt."""
    import comfy.cli_args  # the host's own package (dev.sh puts it on the path): the node asks it for a device
    import numpy as np
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from diffprivacy.evaluation.detection import detection_outcome, distortion
    from diffprivacy.evaluation.images import load_image, match_size, save_image
    from diffprivacy.evaluation.plots import figure_to_image
    from diffprivacy.methods.detector_hiding import load_attack_targets
    from diffprivacy.nodes.detector_nodes import DiffPrivacyHideFromDetectors
    from hide_from_detectors import BLUR_STEPS, MOSAIC_STEPS, tuned_baseline  # scripts/, beside this file
    from PIL import Image

    image = load_image(photo)
    if max(image.shape[:2]) > max_side:
        s = max_side / max(image.shape[:2])
        image = match_size(image, torch.zeros(round(image.shape[0] * s), round(image.shape[1] * s), 3))
    image = (image * 255).round() / 255
    (mtcnn,) = load_attack_targets(["mtcnn"])
    faces = mtcnn.detect(image)
    if not faces:
        raise SystemExit(f"{photo}: MTCNN finds no face in it; choose another --photo")
    inputs = DiffPrivacyHideFromDetectors.INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in inputs.items() if name != "image"}
    with torch.inference_mode():
        out_ = DiffPrivacyHideFromDetectors().hide(image[None], **defaults)
    receipt = out_["ui"]["text"][0]
    hidden, delta = out_["result"][:2]   # image, perturbation (then the report and what else the node returns)
    with tempfile.TemporaryDirectory() as tmp:  # judged as saved: the PNG read back
        save_image(hidden[0], Path(tmp) / "hidden.png")
        saved = load_image(Path(tmp) / "hidden.png")
    boxes = torch.stack([f.box for f in faces])
    none = torch.zeros(0, 4)

    def verdict(img):
        found = mtcnn.detect(img)
        gone = all(detection_outcome(lambda _: found, img, boxes, none)["private_hidden"])
        return found, "MTCNN: no face found" if gone else f"MTCNN: face found ({len(found)})"

    panels = [("original", image, *verdict(image), ""),
              (f"hidden (R_p {defaults['range_rp']:g}, region {defaults['region']:g})", saved, *verdict(saved),
               f"SSIM {distortion(image, saved)['ssim']:.3f}"),
              (f"the change, x{255 / (2 * defaults['range_rp']) * 2:.0f} (grey: none)",
               (0.5 + (delta[0] - 0.5) * 2).clamp(0, 1), [], "", "")]
    for method, steps in (("blur", BLUR_STEPS), ("mosaic", MOSAIC_STEPS)):
        tuned = tuned_baseline(image, [f.box for f in faces], method, steps, mtcnn.detect, boxes, none)
        if tuned is None:
            continue
        from diffprivacy.evaluation.baselines import apply_baseline
        covered, _ = apply_baseline(image, [f.box for f in faces], method, tuned["strength"], margin=0.2)
        covered = (covered.clamp(0, 1) * 255).round() / 255
        panels.append((f"{method}, weakest that hides", covered, *verdict(covered), f"SSIM {tuned['ssim']:.3f}"))
    x1, y1, x2, y2 = (float(v) for v in faces[0].box)
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, 1.1 * max(x2 - x1, y2 - y1)
    top, left = int(max(0, cy - half)), int(max(0, cx - half))
    bottom, right = int(min(image.shape[0], cy + half)), int(min(image.shape[1], cx + half))
    fig = Figure(figsize=(3.2 * len(panels), 4.3), dpi=100)
    for i, (title, img, found, caption, quality) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(np.clip(img[top:bottom, left:right].numpy(), 0, 1))
        for f in found:  # what MTCNN finds, drawn on the image
            a, b, c, d = (float(v) for v in f.box)
            ax.add_patch(Rectangle((a - left, b - top), c - a, d - b, fill=False, edgecolor="lime", linewidth=2))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("\n".join(t for t in (caption, quality) if t), fontsize=11)
    fig.suptitle(f"Hide Faces from Detectors, defaults, on the saved PNG. The node's receipt: {receipt}",
                 fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    pixels = (figure_to_image(fig)[0].numpy() * 255).round().astype("uint8")
    save_jpeg(Image.fromarray(pixels), out, 1280)
    print("receipt:", receipt)
    return receipt


def evaluation_figure(faces: Path, out: Path) -> None:
    from diffprivacy.evaluation.baselines import PRESETS, apply_baseline
    from diffprivacy.evaluation.images import list_images, load_image, save_image
    from diffprivacy.evaluation.plots import figure_to_image
    from diffprivacy.evaluation.recognizers import load_evaluation_model
    from diffprivacy.evaluation.report import evaluate_folders, report_figures
    from PIL import Image

    model = load_evaluation_model("dlib")
    identities = faces / "identities.json"
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in list_images(faces).items():
            img = load_image(path)
            covered, _ = apply_baseline(img, [f.box for f in model.detect(img)], "blur", PRESETS["blur"]["strong"])
            save_image(covered.clamp(0, 1), Path(tmp) / (Path(name).stem + ".png"))
        report = evaluate_folders(faces, tmp, None, identities if identities.is_file() else None, {"dlib": model},
                                  lpips="off")
    figs = report_figures(report, {"dlib": model})
    images = [Image.fromarray((figure_to_image(figs[k])[0].numpy() * 255).round().astype("uint8"))
              for k in ("distances_dlib", "tsne_dlib") if k in figs]
    if not images:
        raise SystemExit(f"the report over {faces} made no plots (no faces found?)")
    height = max(i.height for i in images)
    sheet = Image.new("RGB", (sum(i.width for i in images), height), "white")
    x = 0
    for i in images:
        sheet.paste(i, (x, (height - i.height) // 2))
        x += i.width
    save_jpeg(sheet, out, 1280)
    s = report["recognizers"]["dlib"]
    print("dlib over", faces, {k: v for k, v in s.items() if not isinstance(v, (dict, list))})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=SHARED / "photos" / "one-face-astronaut.png")
    ap.add_argument("--faces", type=Path, default=SHARED / "faces-13id")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--only", choices=("hiding", "baselines", "evaluation"), help="make one figure only")
    args = ap.parse_args(argv)
    for p in (args.photo, args.faces):
        if not p.exists():
            ap.error(f"{p} does not exist (the shared test material lives beside the clone; or give a path)")
    if args.only in (None, "hiding"):
        hiding_figure(args.photo, args.out / "hiding.jpg")
    if args.only in (None, "baselines"):
        baselines_figure(args.photo, args.out / "baselines.jpg")
    if args.only in (None, "evaluation"):
        evaluation_figure(args.faces, args.out / "evaluation-blur.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
