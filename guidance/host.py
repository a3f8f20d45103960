"""What the pack asks of its ComfyUI host, in one place: interrupts, progress, the models gradients run
through (:func:`resident_clone`), and the few host APIs that differ between ComfyUI versions
(feature-detected, never version-compared).

Every function works without a running server (plain-function use, tests, the dataset command):
then interrupts never fire and progress goes nowhere.
"""
from __future__ import annotations

import copy
import inspect
import logging
import weakref

log = logging.getLogger("diffprivacy")


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


DISABLE_DYNAMIC_SWITCH = "--disable-dynamic-vram"

# One resident (non-dynamic) copy per loaded model, made the first time a method asks for one and reused by every
# later call: the key is the loaded model object every clone of the loader's patcher shares (``patcher.model``), the
# value what ``clone(model_override=...)`` needs to put that copy under a new clone. Weak keys: when ComfyUI drops the
# loaded model, its resident copy goes too. The value must not refer back to the key (it would never be dropped).
_RESIDENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NO_DELEGATE = "dynamic"  # value for a model the host cannot copy: the fallback was chosen (and warned about) once


def _is_dynamic(patcher) -> bool:
    """True for ComfyUI 0.38's ``ModelPatcherDynamic`` (weights streamed per layer); False on 0.3.75 (no such mode)."""
    fn = getattr(patcher, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False


def _resident_patcher(patcher, what: str):
    """A clone of ``patcher`` whose weights stay resident while we back-propagate (see :func:`resident_clone`)."""
    if not _accepts(patcher.clone, "disable_dynamic"):
        return patcher.clone()  # 0.3.75: no dynamic loading; a plain clone shares the resident weights
    if not _is_dynamic(patcher):
        return patcher.clone(disable_dynamic=True)  # a normal patcher already: a plain clone, nothing reloaded
    loaded = patcher.model
    known = _RESIDENT.get(loaded)
    if known is None:
        if getattr(patcher, "cached_patcher_init", None) is None:
            log.warning(
                "[Diff-Privacy] %s is loaded with ComfyUI's dynamic VRAM and came from a loader that leaves no reload "
                "recipe (cached_patcher_init; ComfyUI's core checkpoint loaders set one), so no resident copy can be "
                "made for back-propagation: running on the dynamically loaded weights. If the gradient step fails or "
                "runs out of memory, start ComfyUI with %s (or, for a MODEL, CLIP or VAE, load it with Load "
                "Checkpoint).",
                what, DISABLE_DYNAMIC_SWITCH)
            _RESIDENT[loaded] = known = _NO_DELEGATE
        else:
            try:
                delegate = patcher.clone(disable_dynamic=True)  # ComfyUI reloads the weights from disk: once per model
            except interrupt_exceptions():
                raise
            except Exception as e:  # the file moved since it was loaded, out of memory, a loader's own error, ...
                raise RuntimeError(
                    f"ComfyUI could not reload {what} to make the resident copy that back-propagation needs "
                    f"({type(e).__name__}: {e}). Start ComfyUI with {DISABLE_DYNAMIC_SWITCH} to load models without "
                    "dynamic VRAM (then no copy is needed).") from e
            _RESIDENT[loaded] = delegate.get_clone_model_override()  # (its model, its backups): no link to `loaded`
            log.info("[Diff-Privacy] made the resident copy of %s that gradients run through (once per loaded model; "
                     "%s avoids the copy)", what, DISABLE_DYNAMIC_SWITCH)
            return delegate
    if known is _NO_DELEGATE:
        return patcher.clone()
    return patcher.clone(disable_dynamic=True, model_override=known)


def resident_clone(obj, what: str | None = None):
    """A clone of a MODEL (ModelPatcher, also a VAE's ``patcher``), a CLIP or a CLIP_VISION that a method can
    back-propagate through, on either host. The one place the pack asks for it.

    ComfyUI 0.3.75 keeps loaded weights resident: a plain clone. ComfyUI 0.38 loads models with "dynamic VRAM" on
    NVIDIA GPUs (``ModelPatcherDynamic``: weights streamed per layer, ``force_full_load`` does not pin them);
    ``clone(disable_dynamic=True)`` then gives a normal copy by calling the patcher's ``cached_patcher_init`` factory,
    which reloads the weights from disk on every call and raises without a factory. Here the copy is made once per
    loaded model and reused by every later call (the clone carries the caller's current patches and options on the
    resident weights); without a factory the method runs on the dynamic model, with a warning naming
    ``--disable-dynamic-vram``. A normal (non-dynamic) patcher is cloned as it is.

    CLIP: ComfyUI's ``CLIP.clone(disable_dynamic=True)`` swaps the patcher but keeps the old ``cond_stage_model``; the
    clone returned here runs the resident patcher's model. CLIP_VISION (no clone method): a shallow copy whose
    ``patcher`` is the resident clone and whose ``model`` is that patcher's model.
    """
    if hasattr(obj, "cond_stage_model") and hasattr(obj, "patcher"):  # CLIP
        clip = obj.clone()  # no disable_dynamic: ComfyUI would reload and keep the streamed encoder anyway
        clip.patcher = _resident_patcher(obj.patcher, what or "the CLIP text encoder")
        clip.cond_stage_model = clip.patcher.model  # the encoder that runs is the one loaded resident
        return clip
    if hasattr(obj, "patcher") and hasattr(obj, "model") and hasattr(obj, "encode_image"):  # CLIP_VISION
        vision = copy.copy(obj)
        vision.patcher = _resident_patcher(obj.patcher, what or "the CLIP-vision model")
        vision.model = vision.patcher.model
        return vision
    return _resident_patcher(obj, what or f"the {type(getattr(obj, 'model', obj)).__name__}")


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
