"""Every FLOAT input of every node refuses NaN and infinity with an error naming it (ComfyUI's min/max checks let
NaN through, and the API accepts NaN in JSON: it used to give a 'successful' black image and a saved key)."""
import math

import pytest
import torch

from diffprivacy.nodes import NODE_CLASS_MAPPINGS
from diffprivacy.nodes.common import float_input_names

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
