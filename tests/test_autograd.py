import pytest
import torch

from diffprivacy.guidance.autograd import gradients_enabled, thaw, thaw_inference_tensors


def _inference_model():
    with torch.inference_mode():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
                                torch.nn.Conv2d(4, 2, 1))
        m.register_buffer("scale", torch.tensor(2.0))
        m.requires_grad_(False)
        x = torch.randn(1, 3, 8, 8)
    return m, x


def test_inference_weights_break_autograd_without_the_helper():
    m, x = _inference_model()
    with torch.inference_mode():  # as ComfyUI runs a node
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
                m(xg).sum().backward()


def test_gradient_flows_through_thawed_model_with_same_values():
    m, x = _inference_model()
    with torch.inference_mode():
        ref = m(x)
        with gradients_enabled():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            n = thaw_inference_tensors(m)
            assert n == 7  # 3 weights, 3 biases, 1 buffer
            assert thaw_inference_tensors(m) == 0  # idempotent
            xg = thaw(x).requires_grad_(True)
            out = m(xg)
            assert torch.equal(out.detach(), ref)
            out.square().sum().backward()
            assert xg.grad is not None and xg.grad.abs().sum() > 0
            # frozen weights stay frozen
            assert all(p.grad is None for p in m.parameters())
        # outside the block, ComfyUI's inference mode is back
        assert torch.is_inference_mode_enabled()


def test_thaw_refuses_inference_mode():
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="gradients_enabled"):
            thaw(torch.ones(1))
