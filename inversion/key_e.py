"""Key-E, the ten stage conditionings C^0..C^9 of one image, as one value type.

Key-E travels as ComfyUI CONDITIONING (one entry holding a batch of ten, or ten entries), inside key
files (a [10, tokens, width] tensor and its pooled outputs), and as a text stand-in (one prompt for
every stage). :class:`KeyE` owns every conversion between those forms, so no other module slices
stage batches or names key-file tensors. Each entry may carry the Key-E's provenance (the fingerprints
of the model and text encoder it was made with, :mod:`.key_check`), which every form keeps.
"""
from __future__ import annotations

import torch

from ..guidance.schedule import NUM_STAGES, scheduled_conditioning
from .fingerprint import clip_fingerprint
from .key_check import KEY_E_INFO, key_e_provenance
from .keyfile import KEY_E, KEY_E_POOLED


class KeyE:
    """Ten conditioning entries ``[tensor (1, tokens, width), extras]``, stage 0 (t 0-99) first."""

    def __init__(self, entries: list):
        if len(entries) != NUM_STAGES:
            raise ValueError(f"Key-E holds {NUM_STAGES} stage conditionings (C^0..C^9), got {len(entries)}")
        self.entries = [[t, dict(extra)] for t, extra in entries]

    # -- from ---------------------------------------------------------------------------------
    @classmethod
    def from_conditioning(cls, conditioning, allow_text: bool = True) -> "KeyE":
        """Ten entries, or one entry with a batch of ten (its batch-ten extras such as ``pooled_output``
        are split per stage). With ``allow_text`` one plain conditioning of batch one (a text prompt
        standing in for Key-E, nothing learnt) is used for every stage."""
        if len(conditioning) == NUM_STAGES:
            return cls([[c[0], c[1]] for c in conditioning])
        if len(conditioning) == 1 and conditioning[0][0].shape[0] == NUM_STAGES:
            tensor, extra = conditioning[0]
            return cls([[tensor[i:i + 1], {k: (v[i:i + 1] if _stage_batched(v) else v) for k, v in extra.items()}]
                        for i in range(NUM_STAGES)])
        if allow_text and len(conditioning) == 1 and conditioning[0][0].shape[0] == 1:
            return cls([[conditioning[0][0], conditioning[0][1]] for _ in range(NUM_STAGES)])
        sizes = [tuple(c[0].shape) for c in conditioning]
        raise ValueError("stage conditioning must hold ten stages C^0..C^9: ten entries, or one entry with a batch "
                         f"of ten (got {len(conditioning)} entries of shapes {sizes})")

    @classmethod
    def for_batch(cls, conditioning, n: int) -> list["KeyE"]:
        """One Key-E per image of a batch of ``n``: ``n`` entries that each hold a batch of ten stages (what
        Conditioning Combine makes of n Key-Es, each image its own), or one Key-E in any form (a text
        stand-in, or the one learned Key-E of a batch of one) used for every image."""
        if n > 1 and len(conditioning) == n and all(c[0].shape[0] == NUM_STAGES for c in conditioning):
            return [cls.from_conditioning([c], allow_text=False) for c in conditioning]
        if len(conditioning) not in (1, NUM_STAGES) and len(conditioning) != n:
            raise ValueError(f"key_e holds {len(conditioning)} entries for a batch of {n} image(s): give one Key-E "
                             f"per image (combine {n} Key-Es with Conditioning Combine, in batch order) or one Key-E "
                             "for all")
        return [cls.from_conditioning(conditioning)] * n

    @staticmethod
    def batch_conditioning(key_es: list["KeyE"]) -> list:
        """Several Key-Es as one CONDITIONING (one entry each, in batch order): the inverse of :meth:`for_batch`."""
        return [entry for k in key_es for entry in k.to_conditioning()]

    @classmethod
    def from_stages(cls, cond: torch.Tensor, pooled: torch.Tensor | None = None) -> "KeyE":
        """From [10, tokens, width] stage conditionings and their [10, D] pooled outputs (what MSI training gives)."""
        if cond.ndim != 3 or cond.shape[0] != NUM_STAGES:
            raise ValueError(f"Key-E must be [{NUM_STAGES}, tokens, width], got {tuple(cond.shape)}")
        extra = {"pooled_output": pooled.reshape(NUM_STAGES, -1)} if pooled is not None else {}
        return cls.from_conditioning([[cond, extra]], allow_text=False)

    @classmethod
    def from_texts(cls, clip, stage_text: str) -> "KeyE":
        """A text stand-in (nothing learnt): one line for every stage, or ten lines C^0 (t 0-99) first. It records
        the text encoder it was encoded with."""
        encoded: dict[str, list] = {}
        key_e = cls([encoded.setdefault(t, encode_text(clip, t)) for t in stage_texts(stage_text)])
        return key_e.with_provenance(key_e_provenance(None, clip_fingerprint(clip)))

    @classmethod
    def from_tensors(cls, tensors: dict, source: str = "this key file") -> "KeyE":
        """From a key file's ``key_e`` [10, tokens, width] (and ``key_e_pooled`` [10, D] when present)."""
        if KEY_E not in tensors:
            raise ValueError(f"{source} holds no {KEY_E}")
        cond = tensors[KEY_E]
        if cond.ndim != 3 or cond.shape[0] != NUM_STAGES:
            raise ValueError(f"{source} is malformed: Key-E has shape {tuple(cond.shape)}, "
                             f"expected [{NUM_STAGES}, tokens, width]")
        pooled = tensors.get(KEY_E_POOLED)
        extra = {"pooled_output": pooled.float()} if pooled is not None else {}
        return cls.from_conditioning([[cond.float(), extra]], allow_text=False)

    # -- provenance ---------------------------------------------------------------------------
    @property
    def provenance(self) -> dict | None:
        """The fingerprints of the model / text encoder this Key-E was made with, or None when unknown (a
        conditioning from stock nodes)."""
        for _, extra in self.entries:
            if isinstance(extra.get(KEY_E_INFO), dict):
                return dict(extra[KEY_E_INFO])
        return None

    def with_provenance(self, provenance: dict) -> "KeyE":
        """This Key-E recording ``provenance`` (from :func:`.key_check.key_e_provenance`) in every entry."""
        return KeyE([[t, {**extra, KEY_E_INFO: dict(provenance)}] for t, extra in self.entries])

    # -- to -----------------------------------------------------------------------------------
    def stage_entries(self) -> list:
        """The ten entries (copies of the extras dicts), C^0 first."""
        return [[t, dict(extra)] for t, extra in self.entries]

    @property
    def stages(self) -> torch.Tensor:
        """[10, tokens, width]; stages of different shapes are refused (a prompt over 75 tokens)."""
        shapes = {tuple(t.shape) for t, _ in self.entries}
        if len(shapes) != 1 or any(t.ndim != 3 or t.shape[0] != 1 for t, _ in self.entries):
            raise ValueError(f"Key-E stages must all be [1, tokens, width] of one shape; got {sorted(shapes)} (a "
                             "prompt longer than 75 tokens takes more than one chunk: shorten the long ones)")
        return torch.cat([t for t, _ in self.entries])

    @property
    def pooled(self) -> torch.Tensor | None:
        """[10, D] pooled outputs when every stage carries one, else None."""
        pooled = [extra.get("pooled_output") for _, extra in self.entries]
        if all(isinstance(p, torch.Tensor) for p in pooled):
            return torch.cat([p.reshape(1, -1) for p in pooled])
        return None

    def to_conditioning(self) -> list:
        """One CONDITIONING entry with a batch of ten stages (what Learn / Load Key-E output), with its provenance."""
        pooled, provenance = self.pooled, self.provenance
        extra = {"pooled_output": pooled} if pooled is not None else {}
        if provenance is not None:
            extra[KEY_E_INFO] = provenance
        return [[self.stages, extra]]

    def to_tensors(self) -> dict:
        """The key-file tensors: ``key_e`` and, when present, ``key_e_pooled`` (float32, CPU, contiguous)."""
        tensors = {KEY_E: self.stages.detach().float().cpu().contiguous()}
        pooled = self.pooled
        if pooled is not None:
            tensors[KEY_E_POOLED] = pooled.detach().float().cpu().contiguous()
        return tensors

    def schedule(self, uncond_entry, tau: float) -> list:
        """The embedding schedule (paper Eq. 16): C^{t//100} where t > tau*T, ``uncond_entry`` (UC) below."""
        return scheduled_conditioning(self.stage_entries(), uncond_entry, tau)

    def schedule_every_step(self) -> list:
        """C^{t//100} at every timestep (tau = 0; t = 0, reached only with 1000 steps, also gets C^0):
        what Key-I inversion and recovery run under."""
        stages = self.stage_entries()
        return scheduled_conditioning(stages, stages[0], 0.0)


def _stage_batched(v) -> bool:
    return isinstance(v, torch.Tensor) and v.shape[:1] == (NUM_STAGES,)


def encode_text(clip, text: str):
    """One conditioning entry [tensor, extras] for a prompt, as CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)[0]


def stage_texts(text: str) -> list[str]:
    """Ten stage prompts from a multi-line string: one line for all stages, or exactly ten lines."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * NUM_STAGES
    if len(lines) != NUM_STAGES:
        raise ValueError(f"stage_text needs one line (used for every stage) or {NUM_STAGES} lines "
                         f"(C^0 ... C^9, lowest noise first); it has {len(lines)} non-empty lines")
    return lines
