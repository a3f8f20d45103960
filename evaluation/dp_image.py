"""DP-Image's evaluation rows (thesis §4.5.1.2, Table 4.1), with the privacy label carried into the report.

* FPPSR: the share of protected faces a recognizer judges a *different person* from the original (distance at or
  above its threshold). A protected image where the recognizer finds no face counts as protected, as in the pack's
  protection rate; the count of those is reported beside it.
* ISS: the soft identity similarity, here the cosine between the original's and the protected face's embeddings
  (Cos-IE); higher means more alike.
* SSIM of the whole image against the original.
* :func:`match_strength`: the baseline strength (blur σ, mosaic cell, ...) whose ISS equals a method's ISS, by
  linear interpolation along a measured curve: the thesis compares methods "at matched ISS".
* :func:`embedding_rows`: FPPSR / cosine of the noised *embedding itself* against the original's, per σ with its ε:
  what the mechanism does before any rendering (no generator involved).

A row is only as honest as its images: renders of the random-weight test model are plumbing checks, never results.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..guidance import dp_identity as dpi
from .analysis import analyse_face
from .identity import UNDETECTED_PROTECTED, cos_ie, protection_outcome
from .pixel_metrics import ssim


def dp_rows(face_model, originals: list[torch.Tensor], protected: list[torch.Tensor]) -> dict:
    """FPPSR, mean ISS and mean SSIM of protected images against their originals (lists of (H, W, 3) images)."""
    if len(originals) != len(protected) or not originals:
        raise ValueError(f"{len(originals)} originals and {len(protected)} protected images: give them pairwise")
    outcomes, iss, ssims, no_face, skipped = [], [], [], 0, 0
    for o, p in zip(originals, protected):
        a = analyse_face(face_model, o)
        if a.embedding is None:
            skipped += 1  # the original itself has no face this recognizer sees: nothing to protect or measure
            continue
        b = analyse_face(face_model, p)
        # a protected image without a detected face counts as protected here (as DIFP's Eq. 23; counted too)
        outcomes.append(protection_outcome(face_model, a.embedding, b.embedding, UNDETECTED_PROTECTED))
        if b.embedding is None:
            no_face += 1
        else:
            iss.append(cos_ie(a.embedding, b.embedding))
        if o.shape == p.shape:
            ssims.append(float(ssim(o[None], p[None])[0]))
    def mean(v):
        return float(sum(v) / len(v)) if v else None
    return {"recognizer": face_model.name, "threshold": face_model.threshold, "pairs": len(outcomes),
            "fppsr": mean([float(x) for x in outcomes]), "iss": mean(iss), "ssim": mean(ssims),
            "protected_without_a_face": no_face, "originals_without_a_face": skipped}


def match_strength(curve: list[tuple[float, float]], target_iss: float) -> float | None:
    """The strength at which a baseline's ISS equals ``target_iss`` ((strength, ISS) pairs; None if out of range)."""
    pts = sorted(curve)
    for (s0, i0), (s1, i1) in zip(pts, pts[1:]):
        if min(i0, i1) <= target_iss <= max(i0, i1):
            return s0 if i1 == i0 else s0 + (target_iss - i0) * (s1 - s0) / (i1 - i0)
    return None


def embedding_rows(face_model, embeddings: torch.Tensor, sigmas, clip_radius: float = 1.0, delta: float = 1e-5,
                   seed: int = 1, repeats: int = 10) -> list[dict]:
    """Per σ: ε (one release), the mean cosine of released to original embeddings, and the share of releases the
    recognizer's own threshold calls a different person. ``embeddings`` (N, D) from ``face_model``."""
    rows = []
    x = embeddings.double()
    for k, sigma in enumerate(sigmas):
        report = dpi.account(clip_radius, sigma, delta, 1, seed=seed)
        z = dpi.release(x.repeat(repeats, 1), clip_radius, sigma, dpi.seeded(seed, k), renormalize=True)
        ref = torch.nn.functional.normalize(x, dim=1).repeat(repeats, 1).float()
        d = face_model.distance(ref, z)
        rows.append({"sigma": sigma, "epsilon": report.epsilon, "delta": delta, "clip_radius": clip_radius,
                     "cosine": float(torch.nn.functional.cosine_similarity(ref, z, dim=1).mean()),
                     "expected_cosine": report.expected_cosine,
                     "fppsr_embedding": float((d >= face_model.threshold).float().mean()),
                     "releases": int(z.shape[0])})
    return rows


def labels_of(folder: str | Path) -> dict:
    """The privacy labels of saved DP renders (``*.json`` sidecars written by Save DP Image) in ``folder``:
    {"labels": {image name: statement}, "differentially_private": True / False / "mixed" / None}."""
    found = {}
    for side in sorted(Path(folder).glob("*.json")):
        try:
            d = json.loads(side.read_text())
        except ValueError:
            continue
        if isinstance(d, dict) and "differentially_private" in d and "statement" in d:
            found[d.get("image", side.with_suffix(".png").name)] = d
    flags = {bool(d["differentially_private"]) for d in found.values()}
    return {"labels": {k: d["statement"] for k, d in found.items()},
            "differentially_private": None if not flags else (flags.pop() if len(flags) == 1 else "mixed"),
            "epsilon": sorted({d.get("epsilon") for d in found.values() if d.get("epsilon") is not None}) or None}


def finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x
