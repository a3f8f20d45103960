"""Key-E learning (Diff-Privacy Stage I) as ComfyUI nodes.

- DiffPrivacyLearnKeyE: trains the MSI on one image with the user's frozen MODEL / CLIP / VAE /
  CLIP_VISION, inside the server; outputs Key-E (CONDITIONING, one entry with a batch of ten
  stages), UC, a loss-curve image and the Key-E file's path. Interruptible (the best weights so
  far are saved) and resumable from its file.
- DiffPrivacyLoadKeyE: reads a Key-E file back.
"""
from __future__ import annotations

import logging
import time


from ..guidance.host import check_interrupt
from ..guidance.progress import Step
from ..inversion.clip_features import DEFAULT_LAYERS, parse_layers
from ..inversion.fingerprint import clip_fingerprint, model_fingerprint
from ..inversion.key_e import KeyE
from ..inversion.key_e_file import read_key_e_file, write_key_e_file
from ..inversion.key_check import check_key_file, key_e_provenance
from ..inversion.keyfile import KeyFileExistsError
from ..inversion.loss_curve import loss_curve_image, loss_curve_pil
from ..inversion.msi import VARIANT_MULTI_SCALE, VARIANT_ONE_EMBEDDING
from ..inversion.train_key_e import LR_SCHEDULES, KeyETrainingOptions, train_key_e
from .common import (KEY_SUBFOLDER, KEY_SUFFIX, PASSWORD_WARNING, StepProgress, claim_unused, key_file_name,
                     list_key_files, resolve_key_path, write_new_output_file)

log = logging.getLogger("diffprivacy")

VARIANT_CHOICES = {"multi-scale MSI (paper)": VARIANT_MULTI_SCALE,
                   "one embedding (Ours-OE ablation)": VARIANT_ONE_EMBEDDING}
PRECISION_CHOICES = {"fp32 (reference)": "fp32", "bf16 autocast (faster on GPU)": "bf16"}
PASSWORD_TOOLTIP = ("Password sealing the Key-E file (AES-256-GCM, scrypt); empty writes an unsealed file that anyone "
                    "holding it can use. Key-E is half of the key that undoes the protection. " + PASSWORD_WARNING)
_PREVIEW_EVERY_S = 5.0


class _LossProgress:
    """The progress bar with the loss as text, and a loss-curve preview now and then."""

    def __init__(self, total: int, node_id):
        self.steps = StepProgress(total, node_id)
        self.last_preview = 0.0
        self.losses = []

    def __call__(self, step: Step):
        self.losses.append(step.detail["loss"])
        now = time.monotonic()
        preview = None
        if now - self.last_preview > _PREVIEW_EVERY_S and len(self.losses) > 1:
            preview = ("PNG", loss_curve_pil(self.losses), 512)
            self.last_preview = now
        self.steps(step, preview=preview)


class DiffPrivacyLearnKeyE:
    CATEGORY = "Diff-Privacy/keys"
    DESCRIPTION = ("Stage I of Diff-Privacy: learns Key-E, ten conditional embeddings C^0..C^9 of one image, by "
                   "training the multi-scale image inversion (MSI) module against the frozen diffusion model "
                   "(loss ||eps - eps_theta(z_t, t, C^{t//100})||^2). Writes a Key-E file (sealed with the password "
                   "if given). Cancel keeps the best Key-E so far in the file; resume_path continues a run.")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "IMAGE", "STRING")
    RETURN_NAMES = ("key_e", "uncond", "loss_curve", "key_e_path")
    OUTPUT_TOOLTIPS = ("Key-E: one conditioning entry with a batch of ten stages C^0..C^9, for the embedding "
                       "schedule and the encryption / recovery nodes.",
                       "UC: the empty-prompt conditioning of the same CLIP.",
                       "Training loss per step (light) and its moving average (dark).",
                       "Absolute path of the Key-E file.")
    FUNCTION = "learn"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD 1.x diffusion model (frozen; its weights are not changed)."}),
            "clip": ("CLIP", {"tooltip": "The SD 1.x text encoder of the same checkpoint (frozen)."}),
            "vae": ("VAE", {"tooltip": "The VAE that encodes the image to z_0 (frozen)."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 image encoder (models/clip_vision/), read at "
                                                       "the layers below (frozen)."}),
            "image": ("IMAGE", {"tooltip": "The face image to learn Key-E for (the first image of the batch)."}),
            "steps": ("INT", {"default": 6100, "min": 1, "max": 100000,
                              "tooltip": "Optimisation steps (reference: 6100 at batch 1)."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                        "tooltip": "AdamW learning rate. 1e-4 is what the authors' code uses; the "
                                                   "paper states 1e-3."}),
            "weight_decay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "AdamW weight decay (the authors' code: torch's default 0.01)."}),
            "seed": ("INT", {"default": 23, "min": 0, "max": 0xffffffff,
                             "tooltip": "Seed of the MSI's initial weights and of the timestep / noise / flip "
                                        "draws (reference: 23)."}),
            "variant": (list(VARIANT_CHOICES), {"tooltip": "The paper's multi-scale MSI (five layers, time "
                                                           "modulation, attention), or the Ours-OE ablation: one "
                                                           "embedding from the last layer for all stages."}),
            "timesteps_per_step": ("INT", {"default": 1, "min": 1, "max": 64,
                                           "tooltip": "Timesteps drawn per step and run as one batch (reference: "
                                                      "1). More gives a less noisy gradient per step, so fewer steps "
                                                      "are needed (and GPUs are used better)."}),
            "lr_schedule": (list(LR_SCHEDULES), {"tooltip": "constant (reference) or cosine decay to zero."}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 10000,
                                     "tooltip": "Linear learning-rate warm-up steps (reference: 0)."}),
            "precision": (list(PRECISION_CHOICES), {"tooltip": "fp32: the model's own precision, as the reference "
                                                               "(an fp16 UNet, ComfyUI's default on most GPUs, gets "
                                                               "loss scaling so small gradients survive); bf16: "
                                                               "autocast, faster on recent GPUs."}),
            "random_flip": ("BOOLEAN", {"default": True, "tooltip": "Random horizontal flip of the image "
                                                                    "(reference: p = 0.5)."}),
            "resolution": ("INT", {"default": 512, "min": 0, "max": 2048, "step": 8,
                                   "tooltip": "The image is resized (squashed, bicubic) to this square size before "
                                              "encoding, as the reference (512). 0 keeps its size (cropped to a "
                                              "multiple of 8)."}),
            "layers": ("STRING", {"default": ", ".join(str(x) for x in DEFAULT_LAYERS),
                                  "tooltip": "CLIP-vision encoder layers (1-based) read by the MSI; the paper's "
                                             "3, 7, 11, 15, 24 for ViT-L/14. Ours-OE uses the last one only."}),
            "filename_prefix": ("STRING", {"default": f"{KEY_SUBFOLDER}/key_e",
                                           "tooltip": "Path and name prefix of the Key-E file under the output "
                                                      "folder; a counter is appended."}),
            "password": ("STRING", {"default": "", "tooltip": PASSWORD_TOOLTIP}),
        }, "optional": {
            "resume_path": ("STRING", {"default": "", "tooltip": "A Key-E file to continue training from (absolute or "
                                                                 "relative to the output folder); it is updated in "
                                                                 "place. Empty: start afresh."}),
            "checkpoint_every": ("INT", {"default": 1000, "min": 0, "max": 100000,
                                         "tooltip": "Also write the file every this many steps (0: only at the end "
                                                    "and on cancel)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def learn(self, model, clip, vae, clip_vision, image, steps, learning_rate, weight_decay, seed, variant,
              timesteps_per_step, lr_schedule, warmup_steps, precision, random_flip, resolution, layers,
              filename_prefix, password, resume_path="", checkpoint_every=1000, unique_id=None):
        if variant not in VARIANT_CHOICES or precision not in PRECISION_CHOICES:
            raise ValueError(f"unknown variant {variant!r} or precision {precision!r}")
        options = KeyETrainingOptions(
            steps=steps, learning_rate=learning_rate, weight_decay=weight_decay, seed=seed,
            timesteps_per_step=timesteps_per_step, random_flip=random_flip, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, precision=PRECISION_CHOICES[precision], variant=VARIANT_CHOICES[variant],
            layers=parse_layers(layers), resolution=resolution, checkpoint_every=checkpoint_every).validated()
        model_fp, clip_fp = model_fingerprint(model), clip_fingerprint(clip)

        state = None
        if resume_path and resume_path.strip():
            path = resolve_key_path("", resume_path)
            saved = read_key_e_file(path, password or None)
            check_key_file(saved.metadata, model=model, clip=clip)
            state = saved.state
            log.info("[Diff-Privacy] resuming Key-E training from %s at step %d", path, state.steps_done)
        else:
            path, _ = write_new_output_file(filename_prefix, KEY_SUFFIX, claim_unused)
        written = {"first": state is None}

        def save(state_, cond, pooled):
            write_key_e_file(path, state_, cond, pooled, options, model_fingerprint=model_fp,
                             clip_fingerprint=clip_fp, password=password or None, overwrite=not written["first"])
            written["first"] = False

        progress = _LossProgress(steps, unique_id)
        if state is not None:
            progress.losses = list(state.losses)
        try:
            state, cond, pooled, encoder = train_key_e(
                model, clip, vae, clip_vision, image, options, state=state, progress=progress,
                check_interrupt=check_interrupt, on_checkpoint=save)
        except KeyFileExistsError:
            raise ValueError(f"a file appeared at {path} while training; choose another filename_prefix") from None
        uc, uc_pooled = encoder.uncond()
        key_e = KeyE.from_stages(cond, pooled).with_provenance(key_e_provenance(model_fp, clip_fp)).to_conditioning()
        uncond = [[uc, {"pooled_output": uc_pooled} if uc_pooled is not None else {}]]
        note = "sealed with the password" if password else "NOT sealed: anyone with this file can use Key-E"
        text = f"{key_file_name(path)}: {state.steps_done} steps, last loss {state.losses[-1]:.4f} ({note})"
        return {"ui": {"text": [text]},
                "result": (key_e, uncond, loss_curve_image(state.losses), str(path))}


class DiffPrivacyLoadKeyE:
    CATEGORY = "Diff-Privacy/keys"
    DESCRIPTION = ("Loads a Key-E file written by Learn Key-E: Key-E as CONDITIONING and its loss curve. Refuses a "
                   "wrong password, a damaged file and (when model/clip are connected) a Key-E made for another "
                   "model or text encoder. Key-E comes out recording the model and text encoder it was learnt with, "
                   "so Make Key-I and Recover refuse other ones whether or not model/clip are connected here.")
    RETURN_TYPES = ("CONDITIONING", "IMAGE", "INT")
    RETURN_NAMES = ("key_e", "loss_curve", "steps_done")
    OUTPUT_TOOLTIPS = ("Key-E: one conditioning entry with a batch of ten stages C^0..C^9.",
                       "The training loss curve.", "Training steps the Key-E was learnt with.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key_file": (list_key_files(), {"tooltip": f"A Key-E file under output/{KEY_SUBFOLDER}/, named as Learn "
                                                       "Key-E shows it (press R in the canvas to list one written "
                                                       "since the page loaded). Ignored when key_path is given."}),
            "password": ("STRING", {"default": "", "tooltip": "Password of a sealed file; empty for an unsealed one. "
                                                              + PASSWORD_TOOLTIP}),
        }, "optional": {
            "key_path": ("STRING", {"default": "", "tooltip": "Path of the Key-E file (absolute, or relative to the "
                                                              "output folder; inside the output or input folder). "
                                                              "Overrides key_file."}),
            "model": ("MODEL", {"tooltip": "Optional: refuse a Key-E learnt with another diffusion model."}),
            "clip": ("CLIP", {"tooltip": "Optional: refuse a Key-E learnt with another text encoder."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, key_file):
        return True  # checked when the node runs: the list is empty until a file exists, key_path may replace it

    def load(self, key_file, password, key_path="", model=None, clip=None):
        path = resolve_key_path(key_file, key_path or "")
        saved = read_key_e_file(path, password or None)
        check_key_file(saved.metadata, model=model, clip=clip)
        return (saved.conditioning(), loss_curve_image(saved.state.losses), saved.state.steps_done)


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyLearnKeyE": DiffPrivacyLearnKeyE,
    "DiffPrivacyLoadKeyE": DiffPrivacyLoadKeyE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyLearnKeyE": "Learn Key-E (Diff-Privacy MSI)",
    "DiffPrivacyLoadKeyE": "Load Key-E",
}
