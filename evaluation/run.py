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

from ..guidance.progress import Progress
from ..guidance.progress import report as report_progress
from .analysis import FaceAnalysis, analyse_face, embed_at
from .identity import (UNDETECTED_CONVENTIONS, UNDETECTED_SEPARATE, cos_ie, diversity_summary, identity_distance,
                       leave_one_out_identification, protection_outcome, rate_thresholds)
from .images import match_size
from .lpips import LPIPSUnavailable, load_lpips
from .mesh import FaceMeshUnavailable, load_mesh_evaluator, summarize_mesh
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
             progress: Progress | None = None, lpips: str = "auto",
             keep_embeddings: bool = True, undetected: str = UNDETECTED_SEPARATE,
             distractors: list[tuple[str, Loader]] | None = None, facemesh: str = "auto") -> dict:
    """Every metric over ``items`` for every FACE_MODEL in ``models`` (name -> model).

    ``problems`` may hold entries from pairing folders; more are appended (unreadable images,
    faces not detected, images resized to match). ``lpips``: "auto" (when its weights are in the
    model folders), "off". ``undetected``: the headline protection convention for a protected image
    without a detected face (:data:`.identity.UNDETECTED_CONVENTIONS`; both rates are always
    reported). ``distractors``: (name, loader) of an external gallery of other people, added to the
    identification protocol's different-identity set. ``facemesh``: "auto" (landmark preservation with MediaPipe's
    FaceMesh, ``mesh.py``, when its files are found), "off". ``progress``: a Step per image (its name as the text).
    Returns the report dict (see evaluation/README.md).
    """
    if undetected not in UNDETECTED_CONVENTIONS:
        raise ValueError(f"undetected must be one of {list(UNDETECTED_CONVENTIONS)}, got {undetected!r}")
    problems = problems if problems is not None else []
    lp_model, lp_status = None, {"available": False, "reason": "disabled"}
    if lpips != "off":
        try:
            lp_model = load_lpips()
            lp_status = {"available": True, "weights": lp_model.source}
        except LPIPSUnavailable as e:
            lp_status = {"available": False, "reason": str(e)}
    if facemesh not in ("auto", "off"):
        raise ValueError(f"facemesh must be 'auto' or 'off', got {facemesh!r}")
    mesh_ev, mesh_status = None, {"available": False, "reason": "disabled"}
    if facemesh == "auto":
        try:
            mesh_ev = load_mesh_evaluator()
            mesh_status = {"available": True}
        except FaceMeshUnavailable as e:
            mesh_status = {"available": False, "reason": str(e)}

    per_file: list[dict] = []
    emb: dict[str, dict[str, dict[str, torch.Tensor]]] = {m: {"original": {}, "protected": {}} for m in models}
    distractors = distractors or []
    total = len(items) + len(distractors)
    for k, item in enumerate(items):
        report_progress(progress, k, total, item.name)
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
            if mesh_ev is not None:
                try:
                    rec["facemesh"] = mesh_ev.pair(original, protected)
                except Exception as e:  # one image failing must not end the run
                    problems.append({"file": item.name, "folder": "protected", "problem": f"facemesh: {e}"})
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
    gallery = _gallery_embeddings(distractors, models, problems, progress, len(items), total)
    report_progress(progress, total, total, "done")

    report = {"n_items": total, "recognizers": {}, "protected_pixels": _pixel_summary(per_file, "protected_pixels"),
              "recovered_pixels": _pixel_summary(per_file, "recovered_pixels"), "lpips": lp_status,
              "facemesh": {**mesh_status, **summarize_mesh([r["facemesh"] for r in per_file if "facemesh" in r])},
              "problems": problems, "per_file": per_file}
    labels = {it.name: it.label for it in items if it.label is not None}
    for mname, model in models.items():
        report["recognizers"][mname] = _model_summary(model, mname, per_file, emb[mname], labels, undetected,
                                                      gallery[mname], len(distractors))
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
        # the protected image's own face, as the detector finds it; none found: no distance (the summary reports
        # it separately, and as protected under DIFP's Eq. 23)
        r["distance"] = identity_distance(model, ao.embedding, ap.embedding) if ap.detected else None
        r["protected"] = protection_outcome(model, ao.embedding, ap.embedding)  # None: not detected
        # for identification: the protected face as detected; none found: not identified (no landmarks to align)
        emb["protected"][item.name] = ap.embedding if ap.detected else None
    if recovered is not None:
        e = embed_at(model, recovered, ao.landmarks)
        r["recovered_cos_ie"] = cos_ie(ao.embedding, e)
        r["recovered_distance"] = identity_distance(model, ao.embedding, e)
        r["recovered_identified"] = r["recovered_distance"] < model.threshold


def _gallery_embeddings(distractors, models: dict, problems: list, progress, done: int, total: int) -> dict:
    """name -> {"embeddings": (N, D) or None, "without_face": k} for the external distractor gallery."""
    found = {m: [] for m in models}
    missed = {m: 0 for m in models}
    for k, (name, loader) in enumerate(distractors):
        report_progress(progress, done + k, total, name)
        image = _load(loader, "distractors", name, problems)
        if image is None:
            continue
        for mname, model in models.items():
            try:
                a = analyse_face(model, image)
            except Exception as e:  # one bad gallery image must not end the run
                problems.append({"file": name, "folder": "distractors", "problem": f"{mname}: {type(e).__name__}: {e}"})
                continue
            if a.detected:
                found[mname].append(a.embedding)
            else:
                missed[mname] += 1
    return {m: {"embeddings": torch.stack(found[m]) if found[m] else None, "without_face": missed[m]}
            for m in models}


def _pixel_summary(per_file: list[dict], key: str) -> dict:
    rows = [r[key] for r in per_file if key in r]
    if not rows:
        return {"n": 0}
    out = {"n": len(rows)}
    for metric in rows[0]:
        out[metric] = _mean(r.get(metric) for r in rows)
    out["identical"] = sum(1 for r in rows if r["mse"] == 0.0)
    return out


def _protection_summary(model, prot: list[dict], undetected: str) -> dict:
    """Protection success rates at each reporting threshold under both conventions for undetected faces."""
    detected = [r for r in prot if r["distance"] is not None]
    at = {}
    for label, t in rate_thresholds(model).items():
        at[label] = {"threshold": t,
                     "success_rate_separate": _rate(r["distance"] >= t for r in detected),
                     "success_rate_eq23": _rate(True if r["distance"] is None else r["distance"] >= t for r in prot),
                     "success_rate_aligned": _rate(r["distance_aligned"] >= t for r in prot)}
    calibrated = next(iter(at.values()))
    key = "success_rate_separate" if undetected == UNDETECTED_SEPARATE else "success_rate_eq23"
    return {"convention": undetected, "convention_label": UNDETECTED_CONVENTIONS[undetected],
            "success_rate": calibrated[key] if prot else None,
            "success_rate_separate": calibrated["success_rate_separate"],
            "success_rate_eq23": calibrated["success_rate_eq23"],
            "success_rate_aligned": calibrated["success_rate_aligned"],
            "n": len(prot), "n_detected": len(detected), "n_undetected": len(prot) - len(detected),
            "undetected_rate": _rate(r["distance"] is None for r in prot),
            "mean_distance": _mean(r["distance"] for r in prot), "at_thresholds": at}


def _model_summary(model, mname: str, per_file: list[dict], emb: dict, labels: dict,
                   undetected: str = UNDETECTED_SEPARATE, gallery: dict | None = None, n_gallery: int = 0) -> dict:
    rows = [r["models"][mname] for r in per_file if mname in r.get("models", {})]
    with_face = [r for r in rows if r.get("faces_original", 0) > 0]
    prot = [r for r in with_face if "protected" in r]
    s = {"metric": model.metric, "threshold": model.threshold, "detector": detector_name(model),
         "n_images": len(rows), "n_faces_original": len(with_face)}
    s["protection"] = _protection_summary(model, prot, undetected)
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
                     "identification_rate": _rate(r["recovered_identified"] for r in rec), "n": len(rec),
                     "identification_rate_at": {label: _rate(r["recovered_distance"] < t for r in rec)
                                                for label, t in rate_thresholds(model).items()}}
    ident = {}
    if labels:
        gallery = gallery or {"embeddings": None, "without_face": 0}
        external = gallery["embeddings"]
        n_external = 0 if external is None else len(external)
        ident["distractors_external"] = n_external
        if n_gallery:
            ident["distractor_images"] = n_gallery
            ident["distractors_without_face"] = gallery["without_face"]
        acc, pairs = leave_one_out_identification(model, emb["original"], emb["original"], labels, external)
        ident["original"] = acc if pairs else None
        ident["pairs_original"] = pairs
        if emb["protected"]:
            acc, pairs = leave_one_out_identification(model, emb["original"], emb["protected"], labels, external)
            ident["protected"] = acc if pairs else None
            ident["pairs_protected"] = pairs
            ident["protected_not_detected"] = sum(1 for n, e in emb["protected"].items() if e is None and n in labels)
    s["identification"] = ident
    found = [e for e in emb["protected"].values() if e is not None]
    if len(found) >= 2:
        s["diversity"] = diversity_summary(model, torch.stack(found))
    return s
