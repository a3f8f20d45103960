"""The thesis's FSAP comparison (ch. 5, Tables 5.1-5.3) as a protocol over IMAGE batches.

One row per method, the thesis's columns:

* SPR per recognizer (Eqs. 5.9-5.11): the share of faces whose identity distance between the original and the
  protected image exceeds the recognizer's threshold: dlib's ResNet ("Face Recognition Library", L2 0.6) and
  FaceNet (L2 1.1; the thesis used the VGGFace2 model, this pack ships the CASIA-WebFace one). Each image's
  largest face is embedded where that recognizer's detector finds it. A protected image in which no face is
  found counts as NOT protected, as the thesis's Face Recognition Library counted it (its ablation explains the
  ID-loss-only SPR by exactly this); the count is reported.
* SDR (Eq. 5.12): the share of protected images in which dlib's HOG detector finds a face.
* landmark distances chin / nose / eyes / mouth: mean Euclidean distance, in pixels of the original, between the
  original's and the protected face's dlib 68 points of each region (jaw 0-16, nose 27-35, eyes 36-47, mouth
  48-67), over the images where both faces are found (the protected face: the one overlapping the original's
  box, IoU >= 0.3, else the largest).
* MSE between the original and the protected image, pixels in [0, 1] (the thesis does not state its scale).
"""
from __future__ import annotations

import math
import torch

from ..guidance.progress import Progress, report
from .analysis import analyse_face
from .identity import identity_distance
from .images import match_size
from .utility import match_face

REGIONS = {"chin": (0, 17), "nose": (27, 36), "eyes": (36, 48), "mouth": (48, 68)}
THESIS_ROWS = {  # Table 5.2 / 5.3 as printed: SPR FR-lib, SPR FaceNet (VGGFace2), SDR, chin, nose, eyes, mouth, MSE
    "CIAGAN": (0.918, 0.943, 0.9939, 2.635, 2.130, 2.422, 2.622, 0.131),
    "DeepPrivacy": (0.939, 0.816, 0.9989, 2.070, 1.631, 1.384, 2.712, 0.344),
    "Fawkes (high)": (0.704, 0.564, 0.9990, 0.720, 0.392, 0.389, 0.492, 0.422),
    "FSAP (thesis)": (0.967, 0.960, 1.0, 0.704, 0.666, 0.484, 0.375, 0.112),
}


def region_distances(a, b) -> dict[str, float]:
    """Mean point distance per region between two (68, 2) dlib landmark sets."""
    if tuple(a.shape) != (68, 2) or tuple(b.shape) != (68, 2):
        raise ValueError(f"region distances need dlib's 68 points, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = (a.double() - b.double()).norm(dim=1)
    return {name: float(d[lo:hi].mean()) for name, (lo, hi) in REGIONS.items()}


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def fsap_comparison(originals: torch.Tensor, protected: torch.Tensor, dlib_model, recognizers: dict,
                    progress: Progress | None = None) -> dict:
    """The thesis's row for ``protected`` against ``originals`` ((B, H, W, 3), compared image by image).

    ``dlib_model``: the dlib FACE_MODEL (68 points, detection); ``recognizers``: column name -> FACE_MODEL for
    SPR (e.g. {"dlib": dlib_model, "facenet-casia": facenet}). Returns {"spr": {name: rate}, "sdr", "landmarks":
    {region: px}, "mse", "images": per-image rows, "faces": originals with a face}.
    """
    if not hasattr(dlib_model, "detect_68"):
        raise ValueError("SDR and the landmark distances use dlib's detector and 68 points: connect the dlib face "
                         "model")
    if originals.shape[0] != protected.shape[0]:
        raise ValueError(f"{originals.shape[0]} originals but {protected.shape[0]} protected images: they are "
                         "compared image by image")
    rows = []
    for i, (o, p) in enumerate(zip(originals, protected)):
        p = match_size(p, o)
        row = {"index": i, "mse": float(((o.double() - p.double()) ** 2).mean())}
        ao = analyse_face(dlib_model, o, embed=False)
        ap = analyse_face(dlib_model, p, embed=False)
        row["detected"] = ap.detected
        if ao.detected and ap.detected:
            j = match_face(ao.boxes[0], ap.boxes)
            row.update(region_distances(ao.points[0], ap.points[0 if j is None else j]))
        for name, model in recognizers.items():
            eo = analyse_face(model, o)
            if not eo.detected:
                row[f"spr_{name}"] = None
                row.setdefault("notes", []).append(f"{name}: no face in the original")
                continue
            ep = analyse_face(model, p)
            if not ep.detected:
                row[f"spr_{name}"] = False
                row.setdefault("notes", []).append(f"{name}: no face in the protected image (counts as not protected)")
                continue
            d = identity_distance(model, eo.embedding, ep.embedding)
            row[f"distance_{name}"] = d
            row[f"spr_{name}"] = bool(d > model.threshold)
        rows.append(row)
        report(progress, i + 1, len(originals), f"image {i + 1}/{len(originals)}")
    spr = {}
    for name in recognizers:
        flags = [r[f"spr_{name}"] for r in rows if r.get(f"spr_{name}") is not None]
        spr[name] = sum(flags) / len(flags) if flags else float("nan")
    return {"spr": spr, "thresholds": {n: m.threshold for n, m in recognizers.items()},
            "sdr": sum(r["detected"] for r in rows) / len(rows) if rows else float("nan"),
            "landmarks": {k: _mean(r.get(k) for r in rows) for k in REGIONS},
            "mse": _mean(r["mse"] for r in rows), "images": rows,
            "undetected_protected": sum(not r["detected"] for r in rows)}


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def comparison_table(rows: dict[str, dict], with_thesis: bool = True) -> str:
    """Markdown: the thesis's columns, our measured rows (method -> :func:`fsap_comparison` result), and the
    thesis's printed rows for reference (not comparable numbers: other data, recognizers and scales)."""
    names = []
    for r in rows.values():
        names += [n for n in r["spr"] if n not in names]
    head = "| method | " + " | ".join(f"SPR {n}" for n in names) + " | SDR | chin | nose | eyes | mouth | MSE |"
    lines = [head, "|" + "---|" * (len(names) + 7)]
    for method, r in rows.items():
        cells = [_fmt(r["spr"].get(n)) for n in names] + [_fmt(r["sdr"])]
        cells += [_fmt(r["landmarks"][k]) for k in REGIONS] + [_fmt(r["mse"], 4)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if with_thesis:
        lines.append("")
        lines.append("Thesis (FFHQ/CelebA, FR-lib + FaceNet-VGGFace2, its own scales):")
        lines.append("| method | SPR FR-lib | SPR FaceNet | SDR | chin | nose | eyes | mouth | MSE |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for method, vals in THESIS_ROWS.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:g}" for v in vals) + " |")
    return "\n".join(lines)
