"""Identity energies of Diff-Privacy (paper Eqs. 14, 15, 17) on face embeddings.

Every term maps the embeddings of the current batch of predicted clean images, ``emb`` (B, D),
and the original's embedding ``ref`` (D,) or (B, D), to a scalar. Guidance descends the energy,
so:

* anonymization uses ``L_Idis + L_div``: push every output away from the original identity and
  the outputs away from each other;
* identity hiding uses ``L_is``: keep every output recognisable as the original.

Terms are summed over the batch (not averaged), so one sample's gradient does not depend on the
batch size, as in the reference (batch 4 for anonymization, batch 1 for hiding). All terms use
cosine similarity as the paper does, whatever metric the face model verifies with.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


def _cos_to_reference(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got {tuple(emb.shape)}")
    ref = ref.reshape(1, -1) if ref.dim() == 1 else ref
    if ref.shape[-1] != emb.shape[-1] or ref.shape[0] not in (1, emb.shape[0]):
        raise ValueError(f"reference embedding {tuple(ref.shape)} does not match the batch {tuple(emb.shape)}")
    return F.cosine_similarity(emb, ref.to(emb).expand_as(emb), dim=1)


def identity_dissimilarity(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """L_Idis = sum_i max(cos(F(x), F(x0_hat^i)), 0) (Eq. 14): zero once every output is orthogonal or opposite."""
    return _cos_to_reference(emb, ref).clamp(min=0).sum()


def diversity(emb: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    """L_div = sum over unordered pairs i < j of max(cos(F(x0_hat^i), F(x0_hat^j)), 0) (Eq. 15, as the reference
    counts it)."""
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got {tuple(emb.shape)}")
    if emb.shape[0] < 2:
        return emb.sum() * 0.0  # one output has no pair; keeps the graph so backward still works
    unit = F.normalize(emb, dim=1)
    sim = unit @ unit.t()
    i, j = torch.triu_indices(emb.shape[0], emb.shape[0], offset=1, device=emb.device)
    return sim[i, j].clamp(min=0).sum()


def identity_similarity(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """L_is = sum_i (1 - cos(F(x), F(x0_hat^i))) (Eq. 17): zero when every output has the original's identity."""
    return (1.0 - _cos_to_reference(emb, ref)).sum()


TERMS: dict[str, Callable] = {
    "identity_dissimilarity": identity_dissimilarity,
    "diversity": diversity,
    "identity_similarity": identity_similarity,
}


@dataclass
class Energy:
    """A weighted sum of energy terms: ``Energy({"identity_dissimilarity": 1, "diversity": 1})``."""

    weights: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown energy term(s) {sorted(unknown)}; known: {sorted(TERMS)}")
        bad = {k: w for k, w in self.weights.items() if not math.isfinite(float(w))}
        if bad:
            raise ValueError(f"energy weight(s) {bad} are not finite numbers: give finite weights (e.g. "
                             "diversity_weight 1.0)")
        if not any(float(w) != 0.0 for w in self.weights.values()):
            raise ValueError("an energy needs at least one term with a non-zero weight")

    def __call__(self, emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        total = None
        for name, w in self.weights.items():
            if float(w) == 0.0:
                continue
            value = float(w) * TERMS[name](emb, ref)
            total = value if total is None else total + value
        return total

    def __add__(self, other: "Energy") -> "Energy":
        merged = dict(self.weights)
        for k, w in other.weights.items():
            merged[k] = merged.get(k, 0.0) + w
        return Energy(merged)


def anonymize_energy(dissimilarity_weight: float = 1.0, diversity_weight: float = 1.0) -> Energy:
    """The anonymization energy L_Idis + L_div (Sec. 2.3.3), each term weighted."""
    return Energy({"identity_dissimilarity": dissimilarity_weight, "diversity": diversity_weight})


def hide_energy(similarity_weight: float = 1.0) -> Energy:
    """The identity-hiding energy L_is (Sec. 2.3.4)."""
    return Energy({"identity_similarity": similarity_weight})
