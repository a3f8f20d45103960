"""What the pack asks of its ComfyUI host, in one place: interrupts, progress, and the few host
APIs that differ between ComfyUI versions (feature-detected, never version-compared).

Every function works without a running server (plain-function use, tests, the dataset command):
then interrupts never fire and progress goes nowhere.
"""
from __future__ import annotations

import inspect


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel; no-op outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def interrupt_exceptions() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user cancelled" (to catch, keep the best result so far, re-raise)."""
    try:
        import comfy.model_management as mm
        return (mm.InterruptProcessingException, KeyboardInterrupt)
    except ImportError:
        return (KeyboardInterrupt,)


def progress_bar(total: int):
    """ComfyUI's progress bar for ``total`` units, or None without a server."""
    try:
        import comfy.utils
        return comfy.utils.ProgressBar(total)
    except Exception:  # no comfy package, or no server to report to
        return None


def send_progress_text(text: str, node_id) -> None:
    """Text under the node's progress bar (newer front ends show it); silent where unsupported."""
    if node_id is None:
        return
    try:
        from server import PromptServer
        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server, or an older server without progress text
        pass


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resident_clone(patcher):
    """A clone of a ModelPatcher (MODEL or CLIP) whose weights stay resident while we back-propagate.

    ComfyUI 0.38 loads models with "dynamic VRAM" on NVIDIA GPUs: weights are streamed per layer and
    ``force_full_load`` no longer pins them, so autograd can meet streamed copies or inference tensors.
    Where the host offers ``clone(disable_dynamic=True)`` we ask for it; 0.3.75 has no such mode and
    its plain clone already keeps loaded weights resident.
    """
    if _accepts(patcher.clone, "disable_dynamic"):
        return patcher.clone(disable_dynamic=True)
    return patcher.clone()


def clip_load_device(clip):
    """The device a CLIP's text encoder runs on: its patcher's load device (newer ComfyUI sets the
    encoder's ``execution_device`` that way and may keep the weights elsewhere until use)."""
    patcher = getattr(clip, "patcher", None)
    device = getattr(patcher, "load_device", None)
    if device is not None:
        return device
    return next(clip.cond_stage_model.parameters()).device


def clip_preprocess(*args, **kwargs):
    """ComfyUI's CLIP-vision preprocessing: ``comfy.clip_model.clip_preprocess`` where it lives now
    (0.38), ``comfy.clip_vision.clip_preprocess`` in 0.3.75 (kept there as an alias marked for removal)."""
    try:
        from comfy.clip_model import clip_preprocess as preprocess
    except ImportError:
        from comfy.clip_vision import clip_preprocess as preprocess
    return preprocess(*args, **kwargs)


def cast_to(*args, **kwargs):
    """``comfy.model_management.cast_to`` (0.38), or ``comfy.ops.cast_to`` (0.3.75, an alias in 0.38)."""
    import comfy.model_management as mm
    fn = getattr(mm, "cast_to", None)
    if fn is None:
        import comfy.ops
        fn = comfy.ops.cast_to
    return fn(*args, **kwargs)
