"""The papers' evaluation protocols over IMAGE batches (what the evaluation nodes show).

Each function takes batches compared image by image ((B, H, W, 3) in [0, 1], equally long), a
FACE_MODEL where identities matter, and an optional :data:`~..guidance.progress.Progress` (it gets a
:class:`~..guidance.progress.Step` per image, and may raise to cancel); it returns a plain dict of every
number, per image and summarised. The folder report
(:mod:`.run`) computes the same metrics from the same helpers, streaming files instead.
"""
from __future__ import annotations

import math
import torch

from ..guidance.progress import Progress, report
from .analysis import analyse_face, embed_at
from .identity import (UNDETECTED_CONVENTIONS, UNDETECTED_SEPARATE, cos_ie, diversity_summary, identity_distance,
                       leave_one_out_identification, protection_outcome, protection_success_rate, rate_thresholds)
from .images import match_size
from .pixel_metrics import all_pixel_metrics
from .utility import utility_pair

ALIGNMENTS = ("own detection", "original landmarks")


def _tick(progress: Progress | None, done: int, total: int) -> None:
    report(progress, done, total, f"image {done}/{total}")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def protection_rate(face_model, originals: torch.Tensor, protected: torch.Tensor, alignment: str = ALIGNMENTS[0],
                    progress: Progress | None = None, undetected: str = UNDETECTED_SEPARATE) -> dict:
    """Protection success rate (paper Table 1): the share of faces the recognizer no longer matches to their
    original (distance >= its threshold; for the ArcFace family also at the paper's 0.8, ``at_thresholds``).

    ``alignment`` "own detection": the protected face is found by the detector; a protected image with no face
    found is counted by ``undetected`` (:data:`.identity.UNDETECTED_CONVENTIONS`): "separate" (default) leaves
    it out of the rate and counts it in ``undetected``, "protected" counts it as protected (DIFP Eq. 23).
    "original landmarks": the protected image is aligned where the original's face was.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if undetected not in UNDETECTED_CONVENTIONS:
        raise ValueError(f"undetected must be one of {list(UNDETECTED_CONVENTIONS)}, got {undetected!r}")
    rows, pairs = [], []
    for i, (o, p) in enumerate(zip(originals, protected)):
        p = match_size(p, o)
        ao = analyse_face(face_model, o)
        if not ao.detected:
            rows.append({"index": i, "skipped": "no face detected in the original"})
        else:
            e = analyse_face(face_model, p).embedding if alignment == ALIGNMENTS[0] else embed_at(face_model, p,
                                                                                                    ao.landmarks)
            d = None if e is None else identity_distance(face_model, ao.embedding, e)
            ok = protection_outcome(face_model, ao.embedding, e, undetected)
            pairs.append((ao.embedding, e))
            rows.append({"index": i, "distance": d, "protected": ok,
                         **({"note": "no face detected in the protected image"} if d is None else {})})
        _tick(progress, i + 1, len(originals))
    at = {label: protection_success_rate([protection_outcome(face_model, a, b, undetected, t) for a, b in pairs])
          for label, t in rate_thresholds(face_model).items()}
    return {"success_rate": next(iter(at.values())), "convention": UNDETECTED_CONVENTIONS[undetected],
            "recognizer": face_model.name, "threshold": face_model.threshold, "at_thresholds": at,
            "faces": len(pairs), "undetected": sum(1 for _, b in pairs if b is None), "images": rows}


def identification_accuracy(face_model, originals: torch.Tensor, evaluated: torch.Tensor, labels: list,
                            progress: Progress | None = None, distractors: torch.Tensor | None = None) -> dict:
    """Identification accuracy (paper §3.2.1, Table 3) with every original as the probe in turn, and the
    originals' own accuracy (the paper's 'Original' column). An evaluated image in which no face is detected
    counts as not identified. ``distractors``: images of other people added to the different-identity set
    (the paper used 12,878); the count whose face was found is reported."""
    orig, ev, skipped = {}, {}, []
    for i, (o, e) in enumerate(zip(originals, evaluated)):
        ao = analyse_face(face_model, o)
        if not ao.detected:
            skipped.append({"index": i, "problem": "no face detected in the original"})
        else:
            orig[i] = ao.embedding
            ae = analyse_face(face_model, match_size(e, o))
            ev[i] = ae.embedding if ae.detected else None  # not identified: no landmarks to align it with
        _tick(progress, i + 1, len(originals))
    gallery, without_face = [], 0
    for img in (distractors if distractors is not None else []):
        a = analyse_face(face_model, img)
        if a.detected:
            gallery.append(a.embedding)
        else:
            without_face += 1
    external = torch.stack(gallery) if gallery else None
    lab = dict(enumerate(labels))
    acc, pairs = leave_one_out_identification(face_model, orig, ev, lab, external)
    acc0, _ = leave_one_out_identification(face_model, orig, orig, lab, external)
    if pairs == 0:
        raise ValueError("no probe has another photo of the same person with a detected face, and someone else's "
                         "photo to compare with: give at least two people with two photos each")
    return {"accuracy": acc, "accuracy_originals": acc0, "pairs": pairs,
            "evaluated_not_detected": sum(1 for e in ev.values() if e is None),
            "distractors_external": len(gallery), "distractors_without_face": without_face, "skipped": skipped}


def image_quality(originals: torch.Tensor, others: torch.Tensor, face_model=None, lpips_model=None,
                  progress: Progress | None = None) -> dict:
    """Recovery quality (paper Table 2): MSE, RMSE, MAE, PSNR, SSIM per pair, LPIPS with ``lpips_model``,
    Cos-IE and re-identification with ``face_model``; means over the pairs (PSNR inf when all identical)."""
    rows = []
    for i, (o, x) in enumerate(zip(originals, others)):
        x = match_size(x, o)
        row = {"index": i, **all_pixel_metrics(o, x)}
        if lpips_model is not None:
            row["lpips"] = lpips_model.distance(o, x)
        if face_model is not None:
            ao = analyse_face(face_model, o)
            if ao.detected:
                e = embed_at(face_model, x, ao.landmarks)
                row["cos_ie"] = cos_ie(ao.embedding, e)
                row["same_person"] = identity_distance(face_model, ao.embedding, e) < face_model.threshold
            else:
                row["cos_ie"] = None
                row["note"] = "no face detected in the original"
        rows.append(row)
        _tick(progress, i + 1, len(originals))
    means = {}
    for k in ("mse", "rmse", "mae", "psnr", "ssim", "lpips", "cos_ie"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            means[k] = sum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else float("inf")
    return {"mean": means, "images": rows}


def face_utility(face_model, originals: torch.Tensor, protected: torch.Tensor,
                 progress: Progress | None = None) -> dict:
    """Face utility (paper Table 4): is the original's face found again in the protected image, and how far
    did its box and landmarks move (pixels; 68 points with the dlib model, else 5)?"""
    rows = []
    for i, (o, p) in enumerate(zip(originals, protected)):
        rows.append({"index": i, **utility_pair(analyse_face(face_model, o, embed=False),
                                                analyse_face(face_model, match_size(p, o), embed=False))})
        _tick(progress, i + 1, len(originals))
    det = [r["detected"] for r in rows if r["detected"] is not None]
    if not det:
        raise ValueError("no face was detected in any original image, so detection cannot be compared")
    return {"detection_rate": sum(det) / len(det), "box_distance": _mean(r["box_distance"] for r in rows),
            "landmark_distance": _mean(r["landmark_distance"] for r in rows), "images": rows}


def identity_diversity(face_model, images: torch.Tensor, labels: list, progress: Progress | None = None) -> dict:
    """Diversity of identities (paper Fig. 9): pairwise identity distances among outputs with a face.
    ``_embeddings`` and ``_labels`` (left out of JSON) feed the t-SNE plot."""
    embs, labs, skipped = [], [], []
    for i, img in enumerate(images):
        a = analyse_face(face_model, img)
        if a.detected:
            embs.append(a.embedding)
            labs.append(labels[i])
        else:
            skipped.append(i)
        _tick(progress, i + 1, len(images))
    if len(embs) < 2:
        raise ValueError(f"diversity needs at least two images with a detected face; {len(embs)} had one")
    e = torch.stack(embs)
    return {**diversity_summary(face_model, e), "skipped_no_face": skipped, "_embeddings": e, "_labels": labs}
