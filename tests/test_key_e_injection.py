"""Pseudo-token injection into the user's CLIP text encoder, and CLIP-vision features, on the tiny models."""
import pytest
import torch

from diffprivacy.guidance.autograd import gradients_enabled, thaw_inference_tensors
from diffprivacy.inversion.clip_features import clip_layer_features
from diffprivacy.inversion.text_injection import PseudoTokenEncoder
from key_e_tiny import load_tiny_models


@pytest.fixture(scope="module")
def models(tiny_checkpoint_path, tiny_clip_vision_path):
    return load_tiny_models(tiny_checkpoint_path, tiny_clip_vision_path)


def test_placeholder_position_comes_from_the_tokenizer(models):
    clip = models[1]
    assert PseudoTokenEncoder(clip, "*").position == 1
    enc = PseudoTokenEncoder(clip, "a photo of *")
    assert enc.position == 4 and enc.token_ids[enc.position] == enc.placeholder_id
    with pytest.raises(ValueError, match="exactly once"):
        PseudoTokenEncoder(clip, "a photo of a face")


@pytest.mark.parametrize("clip_skip", [None, -2])
def test_injecting_the_placeholders_own_embedding_reproduces_comfyuis_encoding(models, clip_skip):
    clip = models[1].clone()
    if clip_skip is not None:
        clip.clip_layer(clip_skip)
    enc = PseudoTokenEncoder(clip, "a photo of *")
    with torch.inference_mode():
        expected, expected_pooled = clip.encode_from_tokens(clip.tokenize("a photo of *"), return_pooled=True)
        other, _ = clip.encode_from_tokens(clip.tokenize("a photo of a"), return_pooled=True)
        got, pooled = enc.encode(enc.placeholder_embedding()[None])
    assert got.shape == expected.shape == (1, 77, enc.width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=1e-5)
    assert (got - other).abs().max() > 1e-3  # the check can fail: another token gives another encoding


def test_encoding_is_differentiable_and_causal_in_the_injected_vector(models):
    clip = models[1]
    enc = PseudoTokenEncoder(clip, "a photo of *")
    p = enc.position  # BOS, "a", "photo", "of" come before "*"
    assert p == 4
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        with gradients_enabled():
            thaw_inference_tensors(clip.cond_stage_model)
            base = enc.placeholder_embedding()
            v = (base + base.std() * torch.randn(3, enc.width, generator=g)).requires_grad_(True)  # three different
            cond, _ = enc.encode(v)
            (before_grad,) = torch.autograd.grad(cond[:, :p].pow(2).sum(), v, retain_graph=True, allow_unused=True)
            (after_grad,) = torch.autograd.grad(cond[:, p:].pow(2).sum(), v)
    assert cond.shape == (3, 77, enc.width)
    # causal mask: the tokens before "*" are encoded the same whatever vector is injected ...
    for i in (1, 2):
        torch.testing.assert_close(cond[i, :p], cond[0, :p], atol=1e-6, rtol=0)
    # ... and get no gradient from it, while "*" and every token after it depend on it
    assert before_grad is None or before_grad.abs().max() == 0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (cond[i, p:] - cond[j, p:]).abs().amax(dim=-1).min() > 1e-4, (i, j)
    assert (after_grad.abs().sum(dim=1) > 0).all()


def test_clip_features_are_the_hidden_states_of_the_asked_layers_of_a_correctly_scaled_image(models):
    cv = models[3]
    torch.manual_seed(0)
    image = torch.rand(1, 96, 80, 3)
    with torch.inference_mode():
        feats = clip_layer_features(cv, image, (3, 7, 11, 15, 23, 24))
        reference = cv.encode_image(image)  # ComfyUI's own encode: penultimate = output of layer 23
        black = clip_layer_features(cv, torch.zeros_like(image), (3, 7, 11, 15, 23, 24))
    assert feats.shape == (1, 6, 32)
    torch.testing.assert_close(feats[0, 4], reference["penultimate_hidden_states"][0].mean(0), atol=1e-5, rtol=1e-5)
    assert (feats - black).abs().amax(dim=2).min() > 1e-3  # the image is seen (not the reference's black frame)
    with pytest.raises(ValueError, match="only 24 layers"):
        clip_layer_features(cv, image, (3, 25))
