"""The MSI module alone (no host models): shapes, real attention over the layer tokens, the
Ours-OE variant, dropout, config round trip, and clear errors."""
import pytest
import torch

from diffprivacy.inversion.clip_features import parse_layers
from diffprivacy.inversion.msi import MSI, VARIANT_ONE_EMBEDDING

D, W = 48, 40


def make(variant="multi_scale", layers=(3, 7, 11, 15, 24)):
    torch.manual_seed(0)
    return MSI(D, W, layers, variant=variant, heads=4, head_dim=8).eval()


def test_one_vector_per_row_and_a_different_vector_per_stage():
    msi = make()
    feats = torch.randn(1, 5, D).expand(10, -1, -1)
    out = msi(feats, torch.arange(10))
    assert out.shape == (10, W)
    dist = torch.cdist(out, out)
    assert (dist + torch.eye(10) * 1e9).min() > 1e-3  # every stage has its own vector


def test_every_layer_token_reaches_every_stage_output():
    # The reference attends over one token (a linear map of layer i//2 only); here each stage's
    # output depends on all five layers' features.
    msi = make()
    feats = torch.randn(10, 5, D, requires_grad=True)
    msi(feats, torch.arange(10)).pow(2).sum().backward()
    per_layer = feats.grad.abs().sum(dim=2)  # [stage, layer]
    assert (per_layer > 1e-6).all(), per_layer


def test_readout_attention_is_not_degenerate():
    # Attention weights over the layer tokens differ between stages (softmax over >1 token).
    msi = make()
    feats = torch.randn(1, 5, D).expand(10, -1, -1)
    captured = {}

    def hook(_, args, out):
        captured["q"], captured["k"] = msi.readout.to_q(args[0]), msi.readout.to_k(args[1])
    msi.readout.register_forward_hook(hook)
    msi(feats, torch.arange(10))
    q, k = captured["q"], captured["k"]
    weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)[:, 0]  # [10, 5]
    assert weights.shape == (10, 5)
    assert weights.max() < 0.999
    assert (weights[0] - weights[9]).abs().max() > 1e-4


def test_one_embedding_variant_uses_the_last_layer_only_and_ignores_the_stage():
    msi = make(VARIANT_ONE_EMBEDDING, layers=(24,))
    feats = torch.randn(1, 1, D).expand(10, -1, -1)
    out = msi(feats, torch.arange(10))
    assert torch.allclose(out, out[:1].expand(10, -1))
    assert not hasattr(msi, "stage_modulation")


def test_dropout_is_active_in_training_only():
    msi = make()
    feats, stages = torch.randn(4, 5, D), torch.tensor([0, 3, 6, 9])
    assert torch.equal(msi(feats, stages), msi(feats, stages))
    msi.train()
    assert not torch.equal(msi(feats, stages), msi(feats, stages))
    assert msi.dropout == 0.05 and msi.out[0].p == 0.05 and msi.mix.to_out[1].p == 0.05


def test_config_round_trip_rebuilds_the_same_function():
    msi = make()
    copy = MSI.from_config(msi.config())
    copy.load_state_dict(msi.state_dict())
    copy.eval()
    feats, stages = torch.randn(3, 5, D), torch.tensor([1, 5, 8])
    assert torch.equal(copy(feats, stages), msi(feats, stages))
    assert msi.config()["layers"] == [3, 7, 11, 15, 24]


def test_bad_inputs_give_clear_errors():
    msi = make()
    with pytest.raises(ValueError, match="expects features"):
        msi(torch.randn(2, 4, D), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one stage per"):
        msi(torch.randn(2, 5, D), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unknown MSI variant"):
        MSI(D, W, variant="bogus")


def test_layer_list_parsing():
    assert parse_layers("3, 7,11 ,15,24") == (3, 7, 11, 15, 24)
    for bad in ("", "3,x", "7,3", "0,3", "3,3"):
        with pytest.raises(ValueError):
            parse_layers(bad)
