"""Identity and style streams on the user's SD 1.5 checkpoint (IP-Adapter, IP-Adapter-FaceID): thin adapters of
``guidance.ip_adapter`` and ``guidance.identity_streams``.

IDENTITY_ADAPTER: a ``guidance.ip_adapter.IdentityAdapter`` (any of the four kinds, with its FaceID LoRA).
FACE_EMBEDDING: the dict ``guidance.identity_streams.face_identity`` returns (``embedding`` (N, D), ``crops_224``,
``batch_index``, ``landmarks``, ``model``, ``warning``).
"""
from __future__ import annotations

import logging


from ..guidance import identity_streams as streams
from ..guidance import ip_adapter
from ..guidance.face.base import CHOOSE_MODES
from .common import CATEGORY, rgb_batch, tip


log = logging.getLogger("diffprivacy")
ID_CATEGORY = f"{CATEGORY}/identity"
LORA_AUTO, LORA_NONE = "auto", "none"
FACE_CHOICES = tuple(m for m in CHOOSE_MODES if m != "all")

# Recognizers from insightface packs are read from ONNX (see face_nodes); the streams themselves need nothing extra.
REQUIRES: dict = {}

ip_adapter.register_model_folder()


def _adapter_choices() -> list[str]:
    try:
        files = ip_adapter.adapter_files()
    except Exception:  # a folder problem must not break the node list
        files = []
    # the released names are always offered: choosing a missing one gives an error that says where it goes
    return sorted(set(files) | set(ip_adapter.EXPECTED_FILES.values()))


class DiffPrivacyIdentityAdapterLoader:
    DESCRIPTION = ("Loads an SD 1.5 IP-Adapter file from models/ipadapter/: ip-adapter_sd15 / ip-adapter-plus_sd15 "
                   "(style streams, need CLIP-ViT-H) or ip-adapter-faceid_sd15 / ip-adapter-faceid-plusv2_sd15 "
                   "(identity streams from an ArcFace embedding). The kind is recognised from the file's tensors. "
                   "For FaceID files the matching LoRA from models/loras/ is attached and later applied to the model.")

    @classmethod
    def INPUT_TYPES(cls):
        try:
            loras = ip_adapter.lora_files()
        except Exception:
            loras = []
        return {"required": {
            "adapter_name": (_adapter_choices(), tip(
                "File in models/ipadapter/ (.safetensors, or .bin read as plain tensors only). The released names "
                "are always listed; a missing one gives an error saying where to put it.")),
            "lora_name": ([LORA_AUTO, LORA_NONE] + sorted(loras), tip(
                "FaceID LoRA from models/loras/. auto: ip-adapter-faceid_sd15_lora.safetensors or "
                "ip-adapter-faceid-plusv2_sd15_lora.safetensors, whichever fits the adapter, when present. Without "
                "it FaceID still runs, with a warning in the log: identity quality drops. Ignored for style "
                "adapters.", default=LORA_AUTO)),
            "lora_strength": ("FLOAT", tip("Strength of the FaceID LoRA on the model (the FaceID authors use 0.6-1).",
                                           default=1.0, min=-2.0, max=2.0, step=0.05)),
        }}

    RETURN_TYPES = ("IDENTITY_ADAPTER",)
    OUTPUT_TOOLTIPS = ("The adapter (projection + per-layer key/value matrices, and the FaceID LoRA if any), for "
                       "Apply Identity Streams.",)
    FUNCTION = "load"
    CATEGORY = ID_CATEGORY

    def load(self, adapter_name, lora_name, lora_strength):
        adapter = ip_adapter.load_adapter(ip_adapter.adapter_path(adapter_name))
        kind = adapter.spec.kind
        if kind in ip_adapter.FACEID_LORAS and lora_name != LORA_NONE:
            name = ip_adapter.default_lora_name(kind) if lora_name == LORA_AUTO else lora_name
            if name is None:
                log.warning("[Diff-Privacy] %s: no %s in models/loras/; FaceID runs without its LoRA and identity "
                            "quality drops.", adapter_name, ip_adapter.FACEID_LORAS[kind])
            else:
                adapter.lora = ip_adapter.read_lora(ip_adapter.lora_path(name))
                adapter.lora_name, adapter.lora_strength = name, float(lora_strength)
        return (adapter,)


class DiffPrivacyFaceEmbedding:
    DESCRIPTION = ("The identity of a face as an embedding for FaceID: detects the face (the FACE_MODEL's detector), "
                   "aligns it and embeds it with the FACE_MODEL's recognizer. FaceID was trained on ArcFace r50 "
                   "embeddings from insightface's buffalo_l (w600k_r50.onnx): choose arcface-r50 with the buffalo_l "
                   "pack in the face model loader. Other recognizers (FaceNet, antelopev2's glintr100) embed in "
                   "another space; the node warns.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", tip("The donor photo(s): one embedding per image (one face each).")),
            "face_model": ("FACE_MODEL", tip("Detector + recognizer from Face Model Loader; arcface-r50 of the "
                                             "buffalo_l pack is FaceID's space.")),
            "face": (list(FACE_CHOICES), tip("Which face when there are several: the largest, or the index-th "
                                             "(largest first).", default="largest")),
            "index": ("INT", tip("Face index for face = index (0 = the largest).", default=0, min=0, max=64)),
        }}

    RETURN_TYPES = ("FACE_EMBEDDING", "IMAGE")
    RETURN_NAMES = ("face_embedding", "aligned_face")
    OUTPUT_TOOLTIPS = ("The embedding(s) with the aligned 224x224 crops FaceID Plus reads through CLIP.",
                       "The aligned crops (what FaceID Plus's CLIP input sees), for checking the detection.")
    FUNCTION = "embed"
    CATEGORY = ID_CATEGORY

    def embed(self, image, face_model, face, index):
        images = rgb_batch(image)
        result = streams.face_identity(face_model, images, face, index)
        if result["warning"]:
            log.warning("[Diff-Privacy] %s", result["warning"])
        return result, result["crops_224"]


class DiffPrivacyApplyIdentityStreams:
    DESCRIPTION = ("Adds identity and/or style streams to your SD 1.5 MODEL (IP-Adapter's decoupled cross-attention "
                   "on all 16 cross-attention layers, the middle block included): out = Attn(Q,K,V) + w * "
                   "Attn(Q, K', V') with K', V' from the adapter's tokens. Works with the stock KSampler: the "
                   "positive gets the streams, the negative the tokens of a zero embedding (how IP-Adapter was "
                   "trained for 'no condition'). Guiders with more conds switch streams per entry (see "
                   "guidance/identity_streams.py). Tokens are computed once here, not per step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("Your SD 1.5 checkpoint's model (SDXL and SD 2.x are refused).")),
            "identity_weight": ("FLOAT", tip("w of the identity stream (FaceID); 0 turns its extra attention off.",
                                             default=1.0, min=-1.0, max=5.0, step=0.05)),
            "style_weight": ("FLOAT", tip("w of the style stream (IP-Adapter / Plus).", default=1.0, min=-1.0, max=5.0,
                                          step=0.05)),
            "start_at": ("FLOAT", tip("Fraction of sampling where the streams start (0 = the first step).",
                                      default=0.0, min=0.0, max=1.0, step=0.01)),
            "end_at": ("FLOAT", tip("Fraction of sampling where the streams stop (1 = the last step).", default=1.0,
                                    min=0.0, max=1.0, step=0.01)),
        }, "optional": {
            "identity_adapter": ("IDENTITY_ADAPTER", tip(
                "A FaceID adapter (ip-adapter-faceid_sd15.bin or -faceid-plusv2). Its LoRA is applied to the model "
                "clone; without the LoRA it runs with a warning in the log and identity quality drops.")),
            "face_embedding": ("FACE_EMBEDDING", tip("The donor identity from Face Embedding (ArcFace r50, "
                                                     "buffalo_l).")),
            "style_adapter": ("IDENTITY_ADAPTER", tip("A style adapter: ip-adapter_sd15 or ip-adapter-plus_sd15.")),
            "style_image": ("IMAGE", tip("The style image(s), read by clip_vision.")),
            "clip_vision": ("CLIP_VISION", tip("CLIP-ViT-H-14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) for style "
                                               "and FaceID Plus; a ViT-L model is refused.")),
            "layer_weights": ("STRING", tip("Optional: one weight per cross-attention layer, comma-separated, in the "
                                            "order input 1, 2, 4, 5, 7, 8; output 3-11; middle (16 for SD 1.5). "
                                            "Empty: all 1.", default="")),
            "faceid_v2_shortcut": ("FLOAT", tip("FaceID Plus v2: s in tokens = x + s * resampler(x, CLIP states). "
                                                "v1 files have no shortcut (tokens = resampler(x, CLIP states)) "
                                                "and ignore it.", default=1.0, min=0.0, max=5.0, step=0.05)),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model with the streams (and the FaceID LoRA), for KSampler or any guider.",)
    FUNCTION = "apply"
    CATEGORY = ID_CATEGORY

    def apply(self, model, identity_weight, style_weight, start_at, end_at, identity_adapter=None,
              face_embedding=None, style_adapter=None, style_image=None, clip_vision=None, layer_weights="",
              faceid_v2_shortcut=1.0):
        if (identity_adapter is None) != (face_embedding is None):
            raise ValueError("the identity stream needs both identity_adapter and face_embedding connected")
        if (style_adapter is None) != (style_image is None):
            raise ValueError("the style stream needs both style_adapter and style_image connected")
        if identity_adapter is None and style_adapter is None:
            raise ValueError("connect an identity stream (identity_adapter + face_embedding) and/or a style stream "
                             "(style_adapter + style_image)")
        streams.check_sd15_family(model)
        n_layers = len(streams.cross_attention_layers(model))
        lw = streams.parse_layer_weights(layer_weights, n_layers)
        s_start, s_end = streams.sigma_range(model, start_at, end_at)
        todo = []
        if identity_adapter is not None:
            if face_embedding.get("warning"):
                log.warning("[Diff-Privacy] %s", face_embedding["warning"])
            on, off = streams.identity_tokens(identity_adapter, face_embedding["embedding"], clip_vision,
                                              face_embedding.get("crops_224"), faceid_v2_shortcut)
            todo.append(streams.Stream("identity", identity_adapter, on, off, identity_weight, lw, s_start, s_end))
        if style_adapter is not None:
            if clip_vision is None:
                raise ValueError("the style stream reads style_image through CLIP vision: connect clip_vision "
                                 "(CLIP-ViT-H-14 from models/clip_vision/)")
            on, off = streams.style_tokens(style_adapter, clip_vision, rgb_batch(style_image, "style_image"))
            todo.append(streams.Stream("style", style_adapter, on, off, style_weight, lw, s_start, s_end))
        patched, _ = streams.apply_identity_streams(model, todo)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyIdentityAdapterLoader": DiffPrivacyIdentityAdapterLoader,
    "DiffPrivacyFaceEmbedding": DiffPrivacyFaceEmbedding,
    "DiffPrivacyApplyIdentityStreams": DiffPrivacyApplyIdentityStreams,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyIdentityAdapterLoader": "Diff-Privacy Identity Adapter Loader (IP-Adapter / FaceID)",
    "DiffPrivacyFaceEmbedding": "Diff-Privacy Face Embedding (for FaceID)",
    "DiffPrivacyApplyIdentityStreams": "Diff-Privacy Apply Identity Streams",
}
