"""Every FLOAT input of every node refuses NaN and infinity with an error naming it (ComfyUI's min/max checks let
NaN through, and the API accepts NaN in JSON: it used to give a 'successful' black image and a saved key); so does
every IMAGE, MASK, LATENT and FACE_EMBEDDING input (a NaN image from another node ran as 'no face found')."""
import math

import pytest
import torch

from diffprivacy.nodes import NODE_CLASS_MAPPINGS
from diffprivacy.nodes.common import float_input_names, typed_input_names

FLOAT_INPUTS = [(node_id, name) for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items())
                for name in float_input_names(cls)]


def test_the_sweep_covers_the_guidance_settings():
    assert ("DiffPrivacyAnonymize", "diversity_weight") in FLOAT_INPUTS
    assert ("DiffPrivacyHide", "lambda_below") in FLOAT_INPUTS
    assert len(FLOAT_INPUTS) >= 20


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("node_id,name", FLOAT_INPUTS)
def test_a_non_finite_float_input_is_refused_by_name(node_id, name, value):
    cls = NODE_CLASS_MAPPINGS[node_id]
    with pytest.raises(ValueError, match=f"{name} is {value}"):
        getattr(cls(), cls.FUNCTION)(**{name: value})


def test_finite_values_pass_through_the_guard(tiny_sd):
    cls = NODE_CLASS_MAPPINGS["DiffPrivacyDDIMSigmas"]
    (sigmas,) = getattr(cls(), cls.FUNCTION)(model=tiny_sd[0], steps=10, strength=0.5)
    assert len(sigmas) == 6 and float(sigmas[-1]) == 0.0 and bool(torch.isfinite(sigmas).all())


NAN_TENSORS = {"IMAGE": torch.full((1, 8, 8, 3), math.nan), "MASK": torch.full((1, 8, 8), math.inf),
               "LATENT": {"samples": torch.full((1, 4, 8, 8), -math.inf)},
               "FACE_EMBEDDING": {"embedding": torch.full((1, 512), math.nan)}}
TENSOR_INPUTS = [(node_id, name, kind) for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items())
                 for name, kind in typed_input_names(cls, tuple(NAN_TENSORS))]


def test_the_tensor_sweep_covers_images_latents_and_embeddings():
    assert ("DiffPrivacyHideFromDetectors", "image", "IMAGE") in TENSOR_INPUTS
    assert ("DiffPrivacySaveImageClean", "images", "IMAGE") in TENSOR_INPUTS
    assert ("DiffPrivacyRecover", "key_i", "LATENT") in TENSOR_INPUTS
    assert ("DiffPrivacyApplyIdentityStreams", "face_embedding", "FACE_EMBEDDING") in TENSOR_INPUTS
    assert len(TENSOR_INPUTS) >= 30


@pytest.mark.parametrize("node_id,name,kind", TENSOR_INPUTS)
def test_a_non_finite_tensor_input_is_refused_by_name(node_id, name, kind):
    cls = NODE_CLASS_MAPPINGS[node_id]
    with pytest.raises(ValueError, match=f"the {kind} input {name} holds NaN or infinity"):
        getattr(cls(), cls.FUNCTION)(**{name: NAN_TENSORS[kind]})


def test_torch_size_errors_inside_a_node_become_a_message_in_the_users_terms():
    from diffprivacy.nodes.common import guard_float_inputs

    class Node:
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE", {"tooltip": "x"})}}

        def run(self, image):
            return (image.expand(1, 8, 8, 3) + torch.zeros(1, 32, 32, 3),)

    guard_float_inputs(Node)
    with pytest.raises(ValueError, match="do not fit together") as caught:
        Node().run(image=torch.zeros(1, 8, 8, 3))
    assert "tensor" not in str(caught.value) and "Node" in str(caught.value)
