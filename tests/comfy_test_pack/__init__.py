"""Test-only ComfyUI node pack: teaches the stock loaders the tiny random-weight models.

ComfyUI recognises a checkpoint by the shapes in its state dict, and knows only real model
sizes. The tests build small SD 1.x-family checkpoints and a small CLIP-vision model with
ComfyUI's own classes; this pack (linked into the test server's custom_nodes, and imported
by in-process tests) registers their types so that the stock CheckpointLoaderSimple and
CLIPVisionLoader load them. It is never part of the product.
"""
from __future__ import annotations

import functools
import os

import comfy.clip_vision
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

NODE_CLASS_MAPPINGS: dict = {}

TINY_TEXT_WIDTH = 64
TINY_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": TINY_TEXT_WIDTH, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-05, "projection_dim": TINY_TEXT_WIDTH,
    "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0,
    "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32",
}
TINY_VISION_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_clip_vision.json")


class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
    """SD1's text-encoder wrapper with a two-layer, 64-wide CLIP text transformer."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(TINY_TEXT_CONFIG),
                                       return_projected_pooled=False)
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=clip_model, **kwargs)


class TinySD1Tokenizer(comfy.sd1_clip.SD1Tokenizer):
    """The real SD1 tokenizer; only the embedding width differs."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=TINY_TEXT_WIDTH)
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, tokenizer=tokenizer)


class TinySD15(comfy.supported_models.SD15):
    """SD 1.x family, 32 base channels, 64-wide text conditioning (same schedule, latent format, ε-prediction)."""
    unet_config = {"context_dim": TINY_TEXT_WIDTH, "model_channels": 32, "use_linear_in_transformer": False,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": 4, "num_head_channels": -1}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(TinySD1Tokenizer, TinySD1ClipModel)


TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": TINY_TEXT_WIDTH, "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

_stock_load_clipvision_from_sd = comfy.clip_vision.load_clipvision_from_sd


def _load_clipvision_from_sd(sd, prefix="", convert_keys=False):
    """The stock detector, plus: a CLIP-vision state dict of the tiny width gets the tiny config."""
    width_key = prefix + "vision_model.embeddings.class_embedding"
    if not convert_keys and width_key in sd and sd[width_key].shape[0] == 32:
        clip = comfy.clip_vision.ClipVisionModel(TINY_VISION_JSON)
        clip.load_sd({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        return clip
    return _stock_load_clipvision_from_sd(sd, prefix=prefix, convert_keys=convert_keys)


def register():
    if TinySD15 not in comfy.supported_models.models:
        comfy.supported_models.models.append(TinySD15)
    comfy.clip_vision.load_clipvision_from_sd = _load_clipvision_from_sd


register()
