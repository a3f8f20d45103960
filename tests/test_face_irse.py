"""IR-SE (model_ir_se50.pth layout) read with weights_only=True, architecture inferred from keys."""
from __future__ import annotations

import pickle

import pytest
import torch

from diffprivacy.guidance.face import irse


def _tiny_state_dict():
    torch.manual_seed(0)
    units = [(64, 64, 2), (64, 96, 2), (96, 128, 2), (128, 128, 1), (128, 160, 2)]
    net = irse.IRSEBackbone(units, emb=32).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net, units


def test_irse_state_dict_round_trip(tmp_path):
    net, units = _tiny_state_dict()
    path = tmp_path / "model_ir_se50.pth"
    torch.save(net.state_dict(), path)
    loaded = irse.load_irse(path)
    assert [(b.res_layer[1].in_channels, b.res_layer[1].out_channels, b.res_layer[3].stride[0])
            for b in loaded.body] == units
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
    rec = irse.IRSERecognizer(loaded)
    crops = torch.rand(1, 3, 112, 112, requires_grad=True)
    rec(crops).sum().backward()
    assert crops.grad.abs().sum() > 0


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_irse_refuses_files_that_need_code(tmp_path):
    path = tmp_path / "model_ir_se50.pth"
    with open(path, "wb") as f:
        pickle.dump({"input_layer.0.weight": _Evil()}, f)
    with pytest.raises(ValueError, match="not a plain tensor file"):
        irse.load_irse(path)
