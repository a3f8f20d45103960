"""Identity metrics against a FACE_MODEL: protection success rate (paper Table 1, DIFP Eq. 23),
identification accuracy (§3.2.1, Table 3), Cos-IE (Table 2) and pairwise identity distances.

Embeddings are computed once per image (:func:`.analysis.analyse_face`) and the metrics work on them, so a
report over several folders detects and embeds every image once per recognizer.

Two conventions for a protected image in which the detector finds no face:

- ``separate`` (default; Diff-Privacy §3.1.1: protection succeeds when the embedding distance to the
  original exceeds the threshold, so an undetected face has no outcome): it is not counted as protected;
  the success rate is over the faces detected in the protected images, and the undetected ones are
  reported separately;
- ``protected`` (DIFP Eq. 23, PR = NP / NT with NP "faces that cannot be recognized"): it counts as protected.

Thresholds: every recognizer's rates are given at its calibrated threshold; the ArcFace family's also at the
paper's 0.8, which the paper does not define further. It is read here as the L2 distance between unit
embeddings: ||a - b||^2 = 2 - 2 cos, so 0.8 is cosine similarity 0.68, cosine distance 0.32.
"""
from __future__ import annotations

import numpy as np
import torch


def identity_distance(model, a: torch.Tensor, b: torch.Tensor) -> float:
    return float(model.distance(a.view(1, -1), b.view(1, -1))[0])


def cos_ie(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity between two identity embeddings (paper Table 2, higher = same person)."""
    return float(torch.nn.functional.cosine_similarity(a.view(1, -1).double(), b.view(1, -1).double())[0])


UNDETECTED_SEPARATE = "separate"
UNDETECTED_PROTECTED = "protected"
UNDETECTED_CONVENTIONS = {
    UNDETECTED_SEPARATE: "Diff-Privacy §3.1.1: a protected image with no face detected is not counted as protected "
                         "(rate over the faces detected; undetected ones reported separately)",
    UNDETECTED_PROTECTED: "DIFP Eq. 23: a protected image with no face detected counts as protected",
}
PAPER_ARCFACE_L2 = 0.8  # Diff-Privacy §3.1.1's ArcFace threshold, read as L2 between unit embeddings


def protection_outcome(model, original: torch.Tensor, protected: torch.Tensor | None,
                       undetected: str = UNDETECTED_SEPARATE, threshold: float | None = None) -> bool | None:
    """True when the recognizer no longer matches the protected face to the original (distance >= threshold,
    the model's own unless ``threshold`` is given).

    ``protected`` None means no face was found in the protected image: None (no outcome) under the
    ``separate`` convention, True under DIFP's Eq. 23 (``protected``).
    """
    if undetected not in UNDETECTED_CONVENTIONS:
        raise ValueError(f"undetected must be one of {list(UNDETECTED_CONVENTIONS)}, got {undetected!r}")
    if protected is None:
        return True if undetected == UNDETECTED_PROTECTED else None
    return identity_distance(model, original, protected) >= (model.threshold if threshold is None else threshold)


def protection_success_rate(outcomes: list) -> float:
    """The share of True among the outcomes that exist (None: no outcome, left out); NaN when none exists.
    With the ``protected`` convention this is PR = NP / NT (DIFP Eq. 23)."""
    decided = [bool(o) for o in outcomes if o is not None]
    return float(np.mean(decided)) if decided else float("nan")


def is_arcface_family(model) -> bool:
    return model.metric == "cosine" and "arcface" in str(getattr(model, "name", "")).lower()


def rate_thresholds(model) -> dict[str, float]:
    """Label -> threshold (in the model's metric) at which threshold-based rates are reported: the recognizer's
    calibrated one, and for the ArcFace family also the paper's 0.8 (as L2 between unit embeddings)."""
    t = float(model.threshold)
    if model.metric == "cosine":
        calibrated = f"calibrated: cosine distance {t:g} (similarity {1 - t:g})"
    else:
        calibrated = f"calibrated: {model.metric.upper()} {t:g}"
    out = {calibrated: t}
    if is_arcface_family(model):
        cos = 1 - PAPER_ARCFACE_L2 ** 2 / 2
        out[f"paper: 0.8 as L2 between unit embeddings = cosine similarity {cos:g} (distance {1 - cos:g})"] = 1 - cos
    return out


def identification_accuracy(model, probes: torch.Tensor, probe_labels: list, gallery_same: torch.Tensor,
                            gallery_labels: list, distractors: torch.Tensor, distractor_labels: list,
                            ) -> tuple[float, int]:
    """AVIH's protocol (paper §3.2.1): a (probe, same-identity image) pair is identified correctly
    when that image is nearer to the probe than every different-identity image.

    probes (P, D) with labels; gallery_same (G, D): the evaluated (e.g. encrypted) images with
    labels, each probe is compared with those of its own label (the caller leaves the probe's own
    photo out); distractors (N, D): different-identity images, of which those with another label
    count. Returns (accuracy, number of pairs).
    """
    probe_labels = list(probe_labels)
    gallery_labels = list(gallery_labels)
    distractor_labels = list(distractor_labels)
    correct = total = 0
    for i, lab in enumerate(probe_labels):
        p = probes[i:i + 1]
        others = [j for j, l in enumerate(distractor_labels) if l != lab]
        same = [j for j, l in enumerate(gallery_labels) if l == lab]
        if not others or not same:
            continue
        d_other = model.distance(p.expand(len(others), -1), distractors[others]).min()
        d_same = model.distance(p.expand(len(same), -1), gallery_same[same])
        correct += int((d_same < d_other).sum())
        total += len(same)
    return (correct / total if total else float("nan")), total


class _External:
    """The label of an external distractor: another person than every probe."""

    def __eq__(self, other):
        return False

    def __hash__(self):
        return id(self)


def leave_one_out_identification(model, originals: dict[str, torch.Tensor], evaluated: dict,
                                 labels: dict[str, object], distractors: torch.Tensor | None = None,
                                 ) -> tuple[float, int]:
    """Every original in turn is the probe; its Set_s is the *evaluated* images of the other
    photos of the same person, Set_d the originals of everyone else plus ``distractors`` (N, D), an
    external gallery of other people (the paper used 12,878 images) (paper §3.2.1 with all images
    as probes, so a small set still gives many pairs). An evaluated image whose face was not
    detected (``evaluated[name]`` None) counts as not identified: an attacker has no landmarks for
    it. Returns (accuracy, pairs)."""
    correct = total = 0
    names = [n for n in originals if n in labels]
    external = distractors if distractors is not None and len(distractors) else None
    for probe in names:
        lab = labels[probe]
        same = [n for n in names if n != probe and labels[n] == lab and n in evaluated]
        others = [n for n in names if labels[n] != lab]
        if not same or not (others or external is not None):
            continue
        found = [n for n in same if evaluated[n] is not None]
        if found:
            d_set = [torch.stack([originals[n] for n in others])] if others else []
            d_set += [external.to(originals[probe].dtype)] if external is not None else []
            d_labels = [labels[n] for n in others] + ([] if external is None else [_External()] * len(external))
            acc, pairs = identification_accuracy(
                model, originals[probe].view(1, -1), [lab],
                torch.stack([evaluated[n] for n in found]), [lab] * len(found), torch.cat(d_set), d_labels)
            correct += round(acc * pairs)
        total += len(same)
    return (correct / total if total else float("nan")), total


def pairwise_identity_distances(model, embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) distances under the model's metric (diversity, paper Fig. 9)."""
    n = embeddings.shape[0]
    a = embeddings.unsqueeze(1).expand(n, n, -1).reshape(n * n, -1)
    b = embeddings.unsqueeze(0).expand(n, n, -1).reshape(n * n, -1)
    return model.distance(a, b).view(n, n)


def diversity_summary(model, embeddings: torch.Tensor) -> dict[str, float]:
    """Mean / min / max pairwise identity distance and the share of pairs judged different people."""
    n = embeddings.shape[0]
    if n < 2:
        return {"n": n, "mean_distance": float("nan"), "min_distance": float("nan"),
                "max_distance": float("nan"), "different_identity_rate": float("nan")}
    d = pairwise_identity_distances(model, embeddings)
    iu = torch.triu_indices(n, n, offset=1)
    v = d[iu[0], iu[1]]
    return {"n": n, "mean_distance": float(v.mean()), "min_distance": float(v.min()),
            "max_distance": float(v.max()), "different_identity_rate": float((v >= model.threshold).double().mean())}
