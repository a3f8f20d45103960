"""Put a vector in place of the pseudo-token "*" and run the user's frozen CLIP text encoder.

ComfyUI's ``SDClipModel`` accepts, inside a token list, a tensor in place of a token id: its
``process_tokens`` splices the tensor into the token embeddings at that position (the path its
textual-inversion embeddings take) before the positional embeddings and the transformer. We
use that splice with the MSI's output as the tensor. The transformer pass itself is replayed
here layer by layer with the CLIP's own submodules, because ComfyUI's ``CLIPLayer`` adds its
residuals in place (``x += ...``), which autograd rejects; the replay computes the same values
out of place and honours the CLIP's options (clip skip / hidden layer, final layer norm, pooled
projection) and its loaded LoRA patches.

The position of "*" is found by tokenising the placeholder with the CLIP's own tokenizer, so
it is right for any prompt template that contains it ("*", "a photo of *", ...).
"""
from __future__ import annotations

import torch

from ..guidance.host import cast_to, clip_load_device

PLACEHOLDER = "*"


def _single_encoder(clip):
    """The (tokenizer key, SDClipModel) pair of a single-encoder CLIP (SD 1.x: "l" / clip_l)."""
    wrapper = clip.cond_stage_model
    name = getattr(wrapper, "clip", None)
    key = getattr(wrapper, "clip_name", None)
    inner = getattr(wrapper, name, None) if isinstance(name, str) else None
    if inner is None or key is None or not hasattr(inner, "process_tokens"):
        raise ValueError("Key-E learning needs an SD 1.x CLIP (one CLIP-L text encoder); this CLIP has "
                         f"{type(wrapper).__name__}. Use the CLIP of an SD 1.5 checkpoint.")
    return key, inner


class PseudoTokenEncoder:
    """encode(vectors [B, w]) -> (cond [B, 77, w], pooled [B, w] or None), differentiable in ``vectors``."""

    def __init__(self, clip, prompt: str = PLACEHOLDER, placeholder: str = PLACEHOLDER):
        self.clip = clip
        self.prompt = prompt
        self.key, self.text_model = _single_encoder(clip)
        sections = clip.tokenize(prompt)[self.key]
        if len(sections) != 1:
            raise ValueError(f"the Key-E prompt must fit in one 77-token window, got {len(sections)} windows")
        ids = [t for t, _ in sections[0]]
        if not all(isinstance(t, int) for t in ids):
            raise ValueError("the Key-E prompt must not contain textual-inversion embeddings")
        self.placeholder_id = self._placeholder_token(placeholder)
        where = [i for i, t in enumerate(ids) if t == self.placeholder_id]
        if len(where) != 1:
            raise ValueError(f"the Key-E prompt {prompt!r} must contain the placeholder {placeholder!r} exactly once "
                             f"(found {len(where)} times)")
        self.token_ids = ids
        self.position = where[0]
        self.width = int(self.text_model.transformer.get_input_embeddings().weight.shape[1])

    def _placeholder_token(self, placeholder: str) -> int:
        special = set(self.text_model.special_tokens.values())
        words = [t for t, _ in self.clip.tokenize(placeholder)[self.key][0] if t not in special]
        if len(words) != 1:
            raise ValueError(f"the placeholder {placeholder!r} must be a single token of this tokenizer, "
                             f"it is {len(words)} tokens")
        return int(words[0])

    def prepare(self):
        """What CLIP.encode_from_tokens does before encoding: options (clip skip) and loading."""
        self.clip.cond_stage_model.reset_clip_options()
        if self.clip.layer_idx is not None:
            self.clip.cond_stage_model.set_clip_options({"layer": self.clip.layer_idx})
        self.clip.load_model()

    def placeholder_embedding(self) -> torch.Tensor:
        """The token embedding of "*" itself [w] (a natural scale reference for the MSI's output)."""
        emb = self.text_model.transformer.get_input_embeddings()
        return emb.weight[self.placeholder_id].detach().float().clone()

    def encode(self, vectors: torch.Tensor, prepare: bool = True):
        """``prepare=False`` skips the options/loading step (a training loop does it once)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise ValueError(f"expected token vectors [B, {self.width}], got {tuple(vectors.shape)}")
        if prepare:
            self.prepare()
        batch = []
        for row in vectors:
            seq = list(self.token_ids)
            seq[self.position] = row  # spliced in by SDClipModel.process_tokens
            batch.append(seq)
        device = clip_load_device(self.clip)  # where the encoder runs (0.38: not necessarily its weights' device)
        embeds, attention_mask, num_tokens, _ = self.text_model.process_tokens(batch, device)
        return text_transformer_forward(self.text_model, embeds, attention_mask, num_tokens)

    @torch.no_grad()
    def uncond(self):
        """UC: the encoding of the empty prompt [1, 77, w] and its pooled output."""
        return self.clip.encode_from_tokens(self.clip.tokenize(""), return_pooled=True)


def text_transformer_forward(text_model, embeds: torch.Tensor, attention_mask: torch.Tensor, num_tokens):
    """SDClipModel.forward from token embeddings, without in-place ops: (cond, pooled or None)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    clip_text = text_model.transformer  # comfy.clip_model.CLIPTextModel
    inner = clip_text.text_model
    x = embeds + cast_to(inner.embeddings.position_embedding.weight, dtype=embeds.dtype, device=embeds.device)

    n = x.shape[1]
    mask = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    if text_model.enable_attention_masks:
        pad = 1.0 - attention_mask.to(x.dtype).reshape(attention_mask.shape[0], 1, 1, -1).expand(-1, 1, n, n)
        mask = pad.masked_fill(pad.to(torch.bool), -torch.finfo(x.dtype).max) + mask
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)

    layers = inner.encoder.layers
    if text_model.layer == "last":
        stop = len(layers) - 1
    elif text_model.layer == "hidden":
        stop = text_model.layer_idx if text_model.layer_idx >= 0 else len(layers) + text_model.layer_idx
    else:
        raise ValueError(f"CLIP layer option {text_model.layer!r} is not supported for Key-E learning")
    hidden = None
    for i, layer in enumerate(layers):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
        if i == stop:
            hidden = x
    final = inner.final_layer_norm(x)  # as ComfyUI: pooled from the full depth, whatever the clip skip
    if text_model.layer == "last" or text_model.layer_norm_hidden_state:
        z = inner.final_layer_norm(hidden)
    else:
        z = hidden
    z = z.float()
    if text_model.zero_out_masked:
        z = z * attention_mask.unsqueeze(-1).float()

    eos = final[torch.arange(final.shape[0], device=final.device), torch.tensor(num_tokens, device=final.device) - 1]
    pooled = clip_text.text_projection(eos).float() if text_model.return_projected_pooled else eos.float()
    return z, pooled
