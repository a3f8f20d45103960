"""Energy terms of Diff-Privacy (Eqs. 14, 15, 17) on hand-made embeddings."""
import pytest
import torch

from diffprivacy.guidance.energy import (Energy, anonymize_energy, diversity, hide_energy, identity_dissimilarity,
                                         identity_similarity)

E = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
REF = torch.tensor([2.0, 0.0])


def test_identity_dissimilarity_clips_negative_cosines():
    # cosines to ref: 1, 0, -1, 1/sqrt2 -> relu sum = 1 + 0.7071
    assert identity_dissimilarity(E, REF).item() == pytest.approx(1 + 2 ** -0.5, abs=1e-6)


def test_diversity_counts_each_unordered_pair_once():
    # pairs: (0,1)=0 (0,2)=-1 (0,3)=.707 (1,2)=0 (1,3)=.707 (2,3)=-.707 -> 2 * 0.7071
    assert diversity(E).item() == pytest.approx(2 * 2 ** -0.5, abs=1e-6)
    same = torch.ones(4, 3)
    assert diversity(same).item() == pytest.approx(6.0, abs=1e-6)  # 4 choose 2
    single = torch.ones(1, 3, requires_grad=True)
    assert diversity(single).item() == 0.0


def test_identity_similarity_is_one_minus_cosine_summed():
    assert identity_similarity(E, REF).item() == pytest.approx(0 + 1 + 2 + (1 - 2 ** -0.5), abs=1e-6)
    assert identity_similarity(REF[None] * 5, REF).item() == pytest.approx(0.0, abs=1e-6)


def test_weighted_composition_and_descent_direction():
    energy = anonymize_energy(2.0, 0.5)
    expected = 2 * identity_dissimilarity(E, REF) + 0.5 * diversity(E)
    assert energy(E, REF).item() == pytest.approx(expected.item(), abs=1e-6)
    assert (hide_energy(1.0) + anonymize_energy(1.0, 0.0))(E, REF).item() == pytest.approx(
        (identity_similarity(E, REF) + identity_dissimilarity(E, REF)).item(), abs=1e-6)
    # a small step against the gradient lowers the energy and the similarity to the reference
    emb = torch.tensor([[1.0, 0.5], [0.9, 0.6]], requires_grad=True)
    val = anonymize_energy()(emb, REF)
    (g,) = torch.autograd.grad(val, emb)
    moved = emb.detach() - 0.1 * g
    assert anonymize_energy()(moved, REF) < val
    assert identity_dissimilarity(moved, REF) < identity_dissimilarity(emb.detach(), REF)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown energy term"):
        Energy({"nonsense": 1.0})
    with pytest.raises(ValueError, match="non-zero"):
        Energy({"diversity": 0.0})
    with pytest.raises(ValueError, match="does not match"):
        identity_dissimilarity(E, torch.ones(3))
