"""The multi-scale image inversion (MSI) module: CLIP-vision features -> one text-token vector per stage.

Layout (paper §2.2, Fig. 2; reference ``Attentions`` in embedding_manager.py, made to work):

1. per layer l: mean-pooled features f_l -> Linear(D, w, no bias) -> Linear(w, w, no bias) ->
   L2-normalise = v_l (the reference's ``mlp0..mlp4``);
2. time modulation: token_l = Emb_stage[i] ⊙ v_l, stage i = t // 100 (the reference's ``t_embed1``),
   plus a learned per-layer position so attention can tell the scales apart;
3. real attention over the L layer tokens: self-attention among them (residual), then a learned
   per-stage query token cross-attends to them and reads out one vector (the reference attends
   over a single token, where softmax is identically 1 and attention is a linear map);
4. Dropout(0.05) + Linear(w, w) -> the vector that replaces the pseudo-token "*".

Dropout 0.05 sits in each attention's output projection and before the last Linear, as in the
reference. The "one embedding" variant (Ours-OE, paper Table 6) uses only the last layer and
no time modulation: one vector shared by all ten stages.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from ..guidance.schedule import NUM_STAGES

VARIANT_MULTI_SCALE = "multi_scale"
VARIANT_ONE_EMBEDDING = "one_embedding"
VARIANTS = (VARIANT_MULTI_SCALE, VARIANT_ONE_EMBEDDING)


class LayerProjector(nn.Module):
    """Two bias-free Linears without activation, then L2-normalisation (reference ``mlp_projector``)."""

    def __init__(self, feature_dim: int, token_dim: int):
        super().__init__()
        self.to_token = nn.Linear(feature_dim, token_dim, bias=False)
        self.refine = nn.Linear(token_dim, token_dim, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.refine(self.to_token(pooled)), dim=-1)


class Attention(nn.Module):
    """Multi-head attention, no bias on q/k/v, output Linear + Dropout (the reference's CrossAttention)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class MSI(nn.Module):
    """forward(features [B, L, D], stages [B]) -> token vectors [B, w]."""

    def __init__(self, feature_dim: int, token_dim: int, layers=(3, 7, 11, 15, 24), *,
                 variant: str = VARIANT_MULTI_SCALE, heads: int = 8, head_dim: int = 64, dropout: float = 0.05):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MSI variant {variant!r}; expected one of {VARIANTS}")
        self.feature_dim, self.token_dim = int(feature_dim), int(token_dim)
        self.layers = tuple(int(x) for x in layers)
        self.variant = variant
        self.heads, self.head_dim, self.dropout = int(heads), int(head_dim), float(dropout)
        n_tokens = len(self.layers) if variant == VARIANT_MULTI_SCALE else 1

        self.projectors = nn.ModuleList(LayerProjector(feature_dim, token_dim) for _ in range(n_tokens))
        self.layer_position = nn.Parameter(torch.zeros(n_tokens, token_dim))
        if variant == VARIANT_MULTI_SCALE:
            self.stage_modulation = nn.Embedding(NUM_STAGES, token_dim)  # N(0, 1) init, as nn.Embedding / reference
        self.stage_query = nn.Parameter(torch.randn(NUM_STAGES if variant == VARIANT_MULTI_SCALE else 1, token_dim)
                                        / token_dim ** 0.5)
        self.mix = Attention(token_dim, heads, head_dim, dropout)
        self.readout = Attention(token_dim, heads, head_dim, dropout)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(token_dim, token_dim))

    def config(self) -> dict:
        """Everything needed to rebuild the module (stored in the Key-E file's metadata)."""
        return {"feature_dim": self.feature_dim, "token_dim": self.token_dim, "layers": list(self.layers),
                "variant": self.variant, "heads": self.heads, "head_dim": self.head_dim, "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict | str) -> "MSI":
        if isinstance(config, str):
            config = json.loads(config)
        c = dict(config)
        return cls(c.pop("feature_dim"), c.pop("token_dim"), c.pop("layers"), **c)

    def forward(self, features: torch.Tensor, stages: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[1] != len(self.layers) or features.shape[2] != self.feature_dim:
            raise ValueError(f"MSI expects features [B, {len(self.layers)}, {self.feature_dim}], "
                             f"got {tuple(features.shape)}")
        stages = stages.to(device=features.device, dtype=torch.long).reshape(-1)
        if stages.numel() != features.shape[0]:
            raise ValueError(f"one stage per feature row expected: {stages.numel()} stages for {features.shape[0]} "
                             f"rows")
        if self.variant == VARIANT_ONE_EMBEDDING:
            features = features[:, -1:]  # Ours-OE: the last layer only
        tokens = torch.stack([p(features[:, j]) for j, p in enumerate(self.projectors)], dim=1)  # [B, L, w]
        if self.variant == VARIANT_MULTI_SCALE:
            tokens = tokens * self.stage_modulation(stages)[:, None, :]
            query = self.stage_query[stages][:, None, :]
        else:
            query = self.stage_query.expand(features.shape[0], 1, -1)
        tokens = tokens + self.layer_position
        tokens = tokens + self.mix(tokens, tokens)
        read = self.readout(query, tokens)[:, 0]
        return self.out(read)
