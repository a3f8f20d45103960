"""The Key-E file: the learned Key-E and everything needed to reuse or resume it.

A key file in the format of inversion/keyfile.py (safetensors, atomic write, sealed with
AES-GCM when a password is given; a Key-E is a secret like any key) holding:

- ``key_e`` [10, 77, w] (C^0..C^9) and ``key_e_pooled`` [10, w] when the CLIP gives one;
- ``msi.<name>``: the MSI's state dict (so training resumes and the MSI can be re-applied);
- ``loss_curve`` [steps_done]: the training loss of every step;

and as metadata: ``kind`` = "key_e_training", the MSI config (layers, widths, variant) as JSON,
the CLIP-vision layers, steps done / planned, the training options, the prompt, whether the run
was interrupted, and the model and text-encoder fingerprints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .keyfile import (KEY_E, KEY_E_POOLED, META_CLIP_FINGERPRINT, META_MODEL_FINGERPRINT, read_key_file,
                      write_key_file)
from ..guidance.schedule import NUM_STAGES
from .key_check import key_e_provenance
from .key_e import KeyE
from .msi import MSI
from .train_key_e import KeyETrainingOptions, KeyETrainingState

KIND = "key_e_training"
META_KIND = "kind"
META_MSI_CONFIG = "msi_config"
META_LAYERS = "layers"
META_VARIANT = "variant"
META_STEPS_DONE = "steps_done"
META_STEPS_TOTAL = "steps_total"
META_OPTIONS = "training_options"
META_PROMPT = "prompt"
META_INTERRUPTED = "interrupted"
META_BEST_LOSS = "best_smoothed_loss"
MSI_PREFIX = "msi."
LOSS_CURVE = "loss_curve"


@dataclass
class KeyEFile:
    cond: torch.Tensor            # [10, 77, w]
    pooled: torch.Tensor | None   # [10, w]
    state: KeyETrainingState      # MSI (eval mode), steps done, loss curve
    options: KeyETrainingOptions  # as trained (steps = the planned total)
    metadata: dict

    def conditioning(self):
        """Key-E as ComfyUI CONDITIONING: one entry with a batch of ten stages."""
        return self.key_e().to_conditioning()

    def key_e(self) -> KeyE:
        """Key-E, recording the model and text encoder the file says it was learnt with."""
        key_e = KeyE.from_stages(self.cond.clone(), self.pooled.clone() if self.pooled is not None else None)
        return key_e.with_provenance(key_e_provenance(self.metadata.get(META_MODEL_FINGERPRINT),
                                                      self.metadata.get(META_CLIP_FINGERPRINT)))


def write_key_e_file(path, state: KeyETrainingState, cond: torch.Tensor, pooled, options: KeyETrainingOptions, *,
                     model_fingerprint: str, clip_fingerprint: str, password: str | None = None,
                     overwrite: bool = False) -> Path:
    tensors = KeyE.from_stages(cond, pooled).to_tensors()
    for name, value in state.msi.state_dict().items():
        tensors[MSI_PREFIX + name] = value.detach().float().cpu().contiguous()
    tensors[LOSS_CURVE] = torch.tensor(state.losses or [float("nan")], dtype=torch.float32)
    config = state.msi.config()
    metadata = {
        META_KIND: KIND,
        META_MSI_CONFIG: json.dumps(config, sort_keys=True),
        META_LAYERS: ",".join(str(x) for x in config["layers"]),
        META_VARIANT: config["variant"],
        META_STEPS_DONE: str(int(state.steps_done)),
        META_STEPS_TOTAL: str(int(options.steps)),
        META_OPTIONS: json.dumps(options.as_dict(), sort_keys=True),
        META_PROMPT: options.prompt,
        META_INTERRUPTED: "1" if state.interrupted else "0",
        META_BEST_LOSS: repr(float(state.best_smoothed_loss)),
        META_MODEL_FINGERPRINT: model_fingerprint,
        META_CLIP_FINGERPRINT: clip_fingerprint,
    }
    return write_key_file(path, tensors, metadata, password or None, overwrite=overwrite)


def read_key_e_file(path, password: str | None = None) -> KeyEFile:
    tensors, metadata = read_key_file(path, password or None)
    name = Path(path).name
    if metadata.get(META_KIND) != KIND or KEY_E not in tensors:
        raise ValueError(f"{name} is not a Key-E file written by Learn Key-E (a key bundle from Save Key is "
                         "loaded with Load Key)")
    try:
        config = json.loads(metadata[META_MSI_CONFIG])
        options_dict = json.loads(metadata[META_OPTIONS])
        steps_done = int(metadata[META_STEPS_DONE])
        msi = MSI.from_config(config)
        msi.load_state_dict({k[len(MSI_PREFIX):]: v for k, v in tensors.items() if k.startswith(MSI_PREFIX)})
        fields = KeyETrainingOptions.__dataclass_fields__
        options = KeyETrainingOptions(**{k: v for k, v in options_dict.items() if k in fields})
        options.layers = tuple(options.layers)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{name} is a damaged Key-E file: {e}") from None
    msi.eval()
    cond = tensors[KEY_E].float()
    if cond.ndim != 3 or cond.shape[0] != NUM_STAGES:
        raise ValueError(f"{name} is a damaged Key-E file: key_e has shape {tuple(cond.shape)}")
    losses = [float(x) for x in tensors.get(LOSS_CURVE, torch.zeros(0)).tolist()][:steps_done]
    state = KeyETrainingState(msi=msi, steps_done=steps_done, losses=losses,
                              best_smoothed_loss=float(metadata.get(META_BEST_LOSS, "inf")),
                              interrupted=metadata.get(META_INTERRUPTED) == "1")
    pooled = tensors.get(KEY_E_POOLED)
    return KeyEFile(cond=cond, pooled=pooled.float() if pooled is not None else None, state=state,
                    options=options, metadata=metadata)
