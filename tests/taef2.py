"""Loader for the real tiny autoencoder in ../shared/weights/taef2_{encoder,decoder}.safetensors (tests only).

FLUX.2 latent space (32 channels, 8x downscale), images in [0, 1]. Layout as documented in
shared/README.md; keys are nn.Sequential indices, so the modules below are built as Sequentials.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv(cin, cout, **kw):
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Block(nn.Module):
    def __init__(self, cin, cout, pooled=False):
        super().__init__()
        self.conv = nn.Sequential(_conv(cin, cout), nn.ReLU(), _conv(cout, cout), nn.ReLU(), _conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.pool = nn.Sequential(nn.Conv2d(cout, 256, 1, bias=False), nn.GroupNorm(4, 256), nn.ReLU(),
                                  nn.Conv2d(256, cout, 1, bias=False)) if pooled else None

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + self.skip(x))


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def decoder() -> nn.Sequential:
    return nn.Sequential(
        Clamp(), _conv(32, 64), nn.ReLU(), Block(64, 64, True), Block(64, 64, True), Block(64, 64, True),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False), Block(64, 64), _conv(64, 3))


def encoder() -> nn.Sequential:
    def down():
        return nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
    return nn.Sequential(
        _conv(3, 64), Block(64, 64),
        down(), Block(64, 64), Block(64, 64), Block(64, 64),
        down(), Block(64, 64), Block(64, 64), Block(64, 64),
        down(), Block(64, 64, True), Block(64, 64, True), Block(64, 64, True),
        _conv(64, 32))


def load(shared_weights_dir) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder), eval mode, frozen. Encoder: image [0, 1] -> latent; decoder: latent -> image ~[0, 1]."""
    from safetensors.torch import load_file
    enc, dec = encoder(), decoder()
    enc.load_state_dict(load_file(str(shared_weights_dir / "taef2_encoder.safetensors")))
    dec.load_state_dict(load_file(str(shared_weights_dir / "taef2_decoder.safetensors")))
    for m in (enc, dec):
        m.eval().requires_grad_(False)
    return enc, dec
