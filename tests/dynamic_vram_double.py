"""ComfyUI 0.38's dynamic VRAM, as far as cloning goes: a test double on the 0.3.75 host the tests run.

Written from ComfyUI 0.38's source (it does not install offline; the test server runs with ``--cpu``, where dynamic
VRAM is off anyway):

* ``comfy/model_patcher.py``: ``ModelPatcher.is_dynamic()`` is False, ``ModelPatcherDynamic.is_dynamic()`` True
  (``CoreModelPatcher`` is the latter when dynamic VRAM is on). ``clone(disable_dynamic=False, model_override=None)``:
  on a dynamic patcher with ``disable_dynamic=True`` the clone's class becomes ``ModelPatcher`` and, unless a
  ``model_override`` is given, its model comes from ``cached_patcher_init`` -- ``(factory, args)`` or
  ``(factory, args, index)``: ``factory(*args, disable_dynamic=True)[index]`` reloads the weights from disk, every
  call -- or, when that is None, ``RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not
  initialized.")``. Otherwise the clone shares ``model_override`` = ``get_clone_model_override()`` = (model, backups)
  of the patcher it came from. Clones copy ``cached_patcher_init``.
* ``comfy/sd.py``: ``CLIP.clone(disable_dynamic=False)`` clones the patcher with that flag and keeps the old
  ``cond_stage_model``. The core checkpoint loaders set ``cached_patcher_init`` on MODEL, CLIP and VAE patchers;
  CLIP-vision models (``CoreModelPatcher`` in ``comfy/clip_vision.py``) get none.

:class:`DynamicLoads` loads the tiny fixtures that way and counts the reloads per part.
"""
from __future__ import annotations

from collections import Counter

import torch

import comfy.clip_vision
import comfy.model_patcher
import comfy.sd

DELEGATE_ERROR = "Cannot create non-dynamic delegate: cached_patcher_init is not initialized."


class ModelPatcher038(comfy.model_patcher.ModelPatcher):
    """0.38's ``ModelPatcher``: 0.3.75's clone plus ``disable_dynamic``, ``model_override``, ``cached_patcher_init``."""
    cached_patcher_init = None

    def is_dynamic(self):
        return False

    def get_clone_model_override(self):
        return self.model, (self.backup, self.object_patches_backup, self.pinned)

    def clone(self, disable_dynamic=False, model_override=None):
        class_ = self.__class__
        if self.is_dynamic() and disable_dynamic:
            class_ = ModelPatcher038
            if model_override is None:
                if self.cached_patcher_init is None:
                    raise RuntimeError(DELEGATE_ERROR)
                temp = self.cached_patcher_init[0](*self.cached_patcher_init[1], disable_dynamic=True)
                if len(self.cached_patcher_init) > 2:
                    temp = temp[self.cached_patcher_init[2]]
                model_override = temp.get_clone_model_override()
        if model_override is None:
            model_override = self.get_clone_model_override()
        n = comfy.model_patcher.ModelPatcher.clone(self)  # 0.3.75 copies patches, options, wrappers, hooks, ...
        n.__class__ = class_
        n.model = model_override[0]
        n.backup, n.object_patches_backup, n.pinned = model_override[1]
        n.cached_patcher_init = self.cached_patcher_init
        return n


class DynamicModelPatcher038(ModelPatcher038):
    """0.38's ``ModelPatcherDynamic`` (weights streamed per layer on a GPU; here the loaded weights as they are)."""

    def is_dynamic(self):
        return True


class CLIP038(comfy.sd.CLIP):
    """0.38's ``CLIP.clone``: the patcher cloned with ``disable_dynamic``, the old ``cond_stage_model`` kept."""

    def clone(self, disable_dynamic=False):
        n = comfy.sd.CLIP.clone(self)
        n.__class__ = CLIP038
        n.patcher = self.patcher.clone(disable_dynamic=disable_dynamic)
        n.cond_stage_model = self.cond_stage_model
        return n


class DynamicLoads:
    """The tiny checkpoint and CLIP-vision model loaded as ComfyUI 0.38 loads them with dynamic VRAM on: MODEL, CLIP,
    VAE and CLIP_VISION on dynamic patchers; the checkpoint's parts with a ``cached_patcher_init`` that reloads from
    disk (the MODEL's in the ``(factory, args, index)`` form), counted in ``reloads[part]``."""

    def __init__(self, checkpoint_path, clip_vision_path=None):
        import comfy_test_pack  # noqa: F401  (registers the tiny model types)
        self.checkpoint_path, self.clip_vision_path = str(checkpoint_path), clip_vision_path
        self.reloads: Counter = Counter()

    def _part(self, part: str):
        """One part of the checkpoint, freshly loaded (one part at a time: several times faster for the tiny one)."""
        with torch.inference_mode():  # as a node runs: inference-tensor weights
            out = comfy.sd.load_checkpoint_guess_config(self.checkpoint_path, output_model=part == "model",
                                                        output_clip=part == "clip", output_vae=part == "vae")
        return out[("model", "clip", "vae").index(part)]

    def _clip_vision(self):
        with torch.inference_mode():
            return comfy.clip_vision.load(str(self.clip_vision_path))

    def _reload(self, part: str, disable_dynamic: bool = False):
        """The loaders' reload recipe: a fresh load from disk, as normal (non-dynamic) patchers."""
        assert disable_dynamic, "ComfyUI calls cached_patcher_init with disable_dynamic=True"
        self.reloads[part] += 1
        if part == "clip_vision":
            return _as(self._clip_vision().patcher, ModelPatcher038)
        if part == "model":
            return _as(self._part("model"), ModelPatcher038), None, None  # the checkpoint loader's tuple
        return _as(self._part(part).patcher, ModelPatcher038)

    def checkpoint(self, factories: bool = True):
        """(MODEL, CLIP, VAE) as the core checkpoint loader gives them; ``factories=False``: as a loader that sets no
        reload recipe does."""
        model, clip, vae = (self._part(p) for p in ("model", "clip", "vae"))
        _as(model, DynamicModelPatcher038, (self._reload, ("model",), 0) if factories else None)
        _as(clip.patcher, DynamicModelPatcher038, (self._reload, ("clip",)) if factories else None)
        _as(vae.patcher, DynamicModelPatcher038, (self._reload, ("vae",)) if factories else None)
        clip.__class__ = CLIP038
        return model, clip, vae

    def clip_vision(self, factory: bool = False):
        """A CLIP_VISION as 0.38's CLIPVisionLoader gives it: dynamic, no reload recipe (``factory=True``: one)."""
        cv = self._clip_vision()
        _as(cv.patcher, DynamicModelPatcher038, (self._reload, ("clip_vision",)) if factory else None)
        return cv


def _as(patcher, cls, init=None):
    patcher.__class__ = cls
    patcher.cached_patcher_init = init
    return patcher
