"""Identity metrics against a FACE_MODEL: protection success rate (paper Table 1, DIFP Eq. 23),
identification accuracy (§3.2.1, Table 3), Cos-IE (Table 2) and pairwise identity distances.

Embeddings are computed once per image (:func:`.analysis.analyse_face`) and the metrics work on them, so a
report over several folders detects and embeds every image once per recognizer.
"""
from __future__ import annotations

import numpy as np
import torch


def identity_distance(model, a: torch.Tensor, b: torch.Tensor) -> float:
    return float(model.distance(a.view(1, -1), b.view(1, -1))[0])


def cos_ie(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity between two identity embeddings (paper Table 2, higher = same person)."""
    return float(torch.nn.functional.cosine_similarity(a.view(1, -1).double(), b.view(1, -1).double())[0])


def protection_outcome(model, original: torch.Tensor, protected: torch.Tensor | None) -> bool:
    """True when the recognizer no longer matches the protected face to the original.

    ``protected`` None means no face was found in the protected image: it cannot be
    recognized, so it counts as protected (NP in DIFP's Eq. 23 counts unrecognized faces).
    """
    if protected is None:
        return True
    return identity_distance(model, original, protected) >= model.threshold


def protection_success_rate(outcomes: list[bool]) -> float:
    """PR = NP / NT (DIFP Eq. 23) as a fraction; NaN for no faces."""
    return float(np.mean(outcomes)) if outcomes else float("nan")


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


def leave_one_out_identification(model, originals: dict[str, torch.Tensor], evaluated: dict[str, torch.Tensor],
                                 labels: dict[str, object]) -> tuple[float, int]:
    """Every original in turn is the probe; its Set_s is the *evaluated* images of the other
    photos of the same person, Set_d the originals of everyone else (paper §3.2.1 with all
    images as probes, so a small set still gives many pairs). Returns (accuracy, pairs)."""
    correct = total = 0
    names = [n for n in originals if n in labels]
    for probe in names:
        lab = labels[probe]
        same = [n for n in names if n != probe and labels[n] == lab and n in evaluated]
        others = [n for n in names if labels[n] != lab]
        if not same or not others:
            continue
        acc, pairs = identification_accuracy(
            model, originals[probe].view(1, -1), [lab],
            torch.stack([evaluated[n] for n in same]), [lab] * len(same),
            torch.stack([originals[n] for n in others]), [labels[n] for n in others])
        correct += round(acc * pairs)
        total += pairs
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
