"""DiffPrivacyEmbeddingSchedule: C^{t//100} above tau*T, UC below, as one native CONDITIONING."""
from __future__ import annotations

from ..inversion.key_e import KeyE, encode_text

CATEGORY = "Diff-Privacy"


class DiffPrivacyEmbeddingSchedule:
    DESCRIPTION = ("The Diff-Privacy embedding schedule (paper Eq. 16): stage conditioning C^{t//100} where the "
                   "DDPM timestep t > tau*T, the unconditional embedding UC where t <= tau*T. Outputs one native "
                   "CONDITIONING with timestep ranges, so stock samplers (KSampler, SamplerCustom) follow it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "Text encoder of your SD 1.5 checkpoint: encodes UC (the empty prompt) "
                                             "and, without stage_conditioning, the stage prompts."}),
                "tau": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "UC is used where t <= tau*T. Paper: 0.4 for anonymization, 0.6 for "
                                             "identity hiding."}),
                "stage_text": ("STRING", {"multiline": True, "default": "a photo of a person",
                                          "tooltip": "Used when stage_conditioning is not connected: one line for "
                                                     "all ten stages, or ten lines for C^0 (t 0-99) ... "
                                                     "C^9 (t 900-999)."}),
            },
            "optional": {
                "stage_conditioning": ("CONDITIONING", {
                    "tooltip": "Key-E: the ten stage conditionings C^0..C^9 (one entry with a batch of ten, as "
                               "the Key-E nodes output, or ten entries). Overrides stage_text."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("scheduled", "uncond")
    OUTPUT_TOOLTIPS = ("Use as the positive conditioning of any sampler (cfg 1.0 reproduces the paper).",
                       "UC, the empty-prompt conditioning: a negative for samplers that need one.")
    FUNCTION = "schedule"
    CATEGORY = CATEGORY

    def schedule(self, clip, tau, stage_text, stage_conditioning=None):
        uncond = encode_text(clip, "")
        if stage_conditioning is not None:
            key_e = KeyE.from_conditioning(stage_conditioning, allow_text=False)
        else:
            key_e = KeyE.from_texts(clip, stage_text)
        width = uncond[0].shape[-1]
        for i, (tensor, _) in enumerate(key_e.entries):
            if tensor.shape[-1] != width:
                raise ValueError(f"stage conditioning C^{i} has width {tensor.shape[-1]} but this CLIP encodes "
                                 f"width {width}: the Key-E was made with another text encoder")
        return key_e.schedule(uncond, tau), [uncond]


NODE_CLASS_MAPPINGS = {"DiffPrivacyEmbeddingSchedule": DiffPrivacyEmbeddingSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"DiffPrivacyEmbeddingSchedule": "Diff-Privacy Embedding Schedule"}
