"""One evaluation run: originals vs protected (and optionally recovered) images, every metric
of the paper for every loaded recognizer, bad input recorded per file instead of aborting.

Items are streamed (each image is loaded, analysed and dropped), so a folder of large photos
never sits in memory. ``evaluate`` returns a plain JSON-able dict; ``report.py`` writes it out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .analysis import FaceAnalysis, analyse_face, embed_at
from .identity import (cos_ie, diversity_summary, identity_distance, leave_one_out_identification,
                       protection_outcome, protection_success_rate)
from .images import match_size
from .lpips import LPIPSUnavailable, load_lpips
from .pixel_metrics import all_pixel_metrics
from .recognizers import detector_name
from .utility import utility_pair

Loader = Callable[[], torch.Tensor]


@dataclass
class Item:
    """One original and its counterparts; loaders are called once and may raise ValueError."""
    name: str
    original: Loader
    protected: Loader | None = None
    recovered: Loader | None = None
    label: object = None  # identity label, None when unknown


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    finite = [v for v in vals if math.isfinite(v)]
    return float(np.mean(finite)) if len(finite) == len(vals) else float(np.mean(vals))


def _rate(flags) -> float | None:
    flags = [bool(f) for f in flags if f is not None]
    return float(np.mean(flags)) if flags else None


def _load(loader: Loader | None, what: str, name: str, problems: list) -> torch.Tensor | None:
    if loader is None:
        return None
    try:
        return loader()
    except (ValueError, OSError) as e:
        problems.append({"file": name, "folder": what, "problem": str(e)})
        return None


def evaluate(items: list[Item], models: dict, *, problems: list | None = None,
             progress: Callable[[int, int, str], None] | None = None, lpips: str = "auto",
             keep_embeddings: bool = True) -> dict:
    """Every metric over ``items`` for every FACE_MODEL in ``models`` (name -> model).

    ``problems`` may hold entries from pairing folders; more are appended (unreadable images,
    faces not detected, images resized to match). ``lpips``: "auto" (when its weights are in the
    model folders), "off". Returns the report dict (see evaluation/README.md).
    """
    problems = problems if problems is not None else []
    lp_model, lp_status = None, {"available": False, "reason": "disabled"}
    if lpips != "off":
        try:
            lp_model = load_lpips()
            lp_status = {"available": True, "weights": lp_model.source}
        except LPIPSUnavailable as e:
            lp_status = {"available": False, "reason": str(e)}

    per_file: list[dict] = []
    emb: dict[str, dict[str, dict[str, torch.Tensor]]] = {m: {"original": {}, "protected": {}} for m in models}
    total = len(items)
    for k, item in enumerate(items):
        if progress:
            progress(k, total, item.name)
        rec = {"file": item.name, "label": item.label}
        per_file.append(rec)
        original = _load(item.original, "originals", item.name, problems)
        if original is None:
            rec["error"] = "original unreadable"
            continue
        protected = _load(item.protected, "protected", item.name, problems)
        recovered = _load(item.recovered, "recovered", item.name, problems)
        for what, img in (("protected", protected), ("recovered", recovered)):
            if img is not None and img.shape != original.shape:
                problems.append({"file": item.name, "folder": what, "problem":
                                 f"size {tuple(img.shape[:2])} differs from the original's "
                                 f"{tuple(original.shape[:2])}: resized to compare"})
        protected = match_size(protected, original) if protected is not None else None
        recovered = match_size(recovered, original) if recovered is not None else None
        if protected is not None:
            rec["protected_pixels"] = all_pixel_metrics(original, protected)
        if recovered is not None:
            rec["recovered_pixels"] = all_pixel_metrics(original, recovered)
            if lp_model is not None:
                rec["recovered_pixels"]["lpips"] = lp_model.distance(original, recovered)
        rec["models"] = {}
        for mname, model in models.items():
            rec["models"][mname] = r = {}
            try:
                _analyse_item(model, mname, item, original, protected, recovered, r, emb[mname], problems)
            except Exception as e:  # a model failing on one image must not end the run
                r["error"] = f"{type(e).__name__}: {e}"
                problems.append({"file": item.name, "folder": "originals", "problem": f"{mname}: {r['error']}"})
    if progress:
        progress(total, total, "")

    report = {"n_items": total, "recognizers": {}, "protected_pixels": _pixel_summary(per_file, "protected_pixels"),
              "recovered_pixels": _pixel_summary(per_file, "recovered_pixels"), "lpips": lp_status,
              "problems": problems, "per_file": per_file}
    labels = {it.name: it.label for it in items if it.label is not None}
    for mname, model in models.items():
        report["recognizers"][mname] = _model_summary(model, mname, per_file, emb[mname], labels)
    if keep_embeddings:
        report["_embeddings"] = emb  # for plots; report.py drops it from the JSON
    return report


def _analyse_item(model, mname, item, original, protected, recovered, r: dict, emb: dict, problems: list):
    ao: FaceAnalysis = analyse_face(model, original)
    r["faces_original"] = ao.n_faces
    if protected is not None:
        ap = analyse_face(model, protected)
        r["faces_protected"] = ap.n_faces
        r.update({k: v for k, v in utility_pair(ao, ap).items() if k in ("detected", "box_distance",
                                                                         "landmark_distance")})
    if not ao.detected:
        problems.append({"file": item.name, "folder": "originals", "problem": f"{mname}: no face detected"})
        return
    emb["original"][item.name] = ao.embedding
    if protected is not None:
        aligned = embed_at(model, protected, ao.landmarks)
        r["distance_aligned"] = identity_distance(model, ao.embedding, aligned)
        r["protected_aligned"] = protection_outcome(model, ao.embedding, aligned)
        # Success as DIFP's Eq. 23 counts it: the protected image's own face (if any) is not matched.
        r["distance"] = identity_distance(model, ao.embedding, ap.embedding) if ap.detected else None
        r["protected"] = protection_outcome(model, ao.embedding, ap.embedding)
        # for identification: the protected face as detected, else the best alignment there is
        emb["protected"][item.name] = ap.embedding if ap.detected else aligned
    if recovered is not None:
        e = embed_at(model, recovered, ao.landmarks)
        r["recovered_cos_ie"] = cos_ie(ao.embedding, e)
        r["recovered_distance"] = identity_distance(model, ao.embedding, e)
        r["recovered_identified"] = r["recovered_distance"] < model.threshold


def _pixel_summary(per_file: list[dict], key: str) -> dict:
    rows = [r[key] for r in per_file if key in r]
    if not rows:
        return {"n": 0}
    out = {"n": len(rows)}
    for metric in rows[0]:
        out[metric] = _mean(r.get(metric) for r in rows)
    out["identical"] = sum(1 for r in rows if r["mse"] == 0.0)
    return out


def _model_summary(model, mname: str, per_file: list[dict], emb: dict, labels: dict) -> dict:
    rows = [r["models"][mname] for r in per_file if mname in r.get("models", {})]
    with_face = [r for r in rows if r.get("faces_original", 0) > 0]
    prot = [r for r in with_face if "protected" in r]
    s = {"metric": model.metric, "threshold": model.threshold, "detector": detector_name(model),
         "n_images": len(rows), "n_faces_original": len(with_face)}
    s["protection"] = {
        "success_rate": protection_success_rate([r["protected"] for r in prot]) if prot else None,
        "success_rate_detected_only": _rate(r["protected"] for r in prot if r["distance"] is not None),
        "success_rate_aligned": _rate(r["protected_aligned"] for r in prot),
        "n": len(prot), "n_undetected": sum(1 for r in prot if r["distance"] is None),
        "mean_distance": _mean(r["distance"] for r in prot),
    }
    util = [r for r in rows if "faces_protected" in r]
    s["utility"] = {
        "detection_rate_original": _rate(r.get("faces_original", 0) > 0 for r in util) if util else None,
        "detection_rate_protected": _rate(r.get("detected") for r in util),
        "box_distance": _mean(r.get("box_distance") for r in util),
        "landmark_distance": _mean(r.get("landmark_distance") for r in util),
        "landmark_points": 68 if hasattr(model, "detect_68") else 5,
    }
    rec = [r for r in with_face if "recovered_cos_ie" in r]
    s["recovery"] = {"cos_ie": _mean(r["recovered_cos_ie"] for r in rec),
                     "identification_rate": _rate(r["recovered_identified"] for r in rec), "n": len(rec)}
    ident = {}
    if labels:
        acc, pairs = leave_one_out_identification(model, emb["original"], emb["original"], labels)
        ident["original"] = acc if pairs else None
        ident["pairs_original"] = pairs
        if emb["protected"]:
            acc, pairs = leave_one_out_identification(model, emb["original"], emb["protected"], labels)
            ident["protected"] = acc if pairs else None
            ident["pairs_protected"] = pairs
    s["identification"] = ident
    if len(emb["protected"]) >= 2:
        s["diversity"] = diversity_summary(model, torch.stack(list(emb["protected"].values())))
    return s
