"""The host-compatibility layer (guidance/host.py): today's ComfyUI 0.38 paths where they exist, 0.3.75's otherwise."""
import pytest
import torch

from diffprivacy.guidance import host


class _Patcher:
    def __init__(self, dynamic_aware: bool):
        self.calls = []
        if dynamic_aware:
            self.clone = self._clone_new
        else:
            self.clone = self._clone_old

    def _clone_new(self, disable_dynamic=False, model_override=None):
        self.calls.append({"disable_dynamic": disable_dynamic})
        return "clone"

    def _clone_old(self):
        self.calls.append({})
        return "clone"


def test_resident_clone_asks_newer_hosts_for_a_non_dynamic_clone():
    new = _Patcher(dynamic_aware=True)
    assert host.resident_clone(new) == "clone"
    assert new.calls == [{"disable_dynamic": True}]


def test_resident_clone_falls_back_to_a_plain_clone_on_older_hosts():
    old = _Patcher(dynamic_aware=False)
    assert host.resident_clone(old) == "clone"
    assert old.calls == [{}]


def test_resident_clone_of_a_real_model_shares_its_weights(tiny_sd):
    model, clip, vae = tiny_sd
    for patcher in (model, vae.patcher):
        clone = host.resident_clone(patcher)
        assert clone is not patcher and clone.model is patcher.model
    assert host.resident_clone(clip).cond_stage_model is clip.cond_stage_model


def test_clip_preprocess_and_cast_to_resolve_on_this_host():
    import comfy.clip_vision
    images = torch.rand(1, 40, 30, 3)
    ours = host.clip_preprocess(images, size=32, mean=[0.5] * 3, std=[0.25] * 3, crop=True)
    theirs = comfy.clip_vision.clip_preprocess(images, size=32, mean=[0.5] * 3, std=[0.25] * 3, crop=True)
    assert ours.shape == (1, 3, 32, 32) and torch.equal(ours, theirs)
    w = torch.ones(3, dtype=torch.float16)
    assert host.cast_to(w, dtype=torch.float32, device=torch.device("cpu")).dtype == torch.float32


def test_the_text_encoder_runs_where_its_patcher_loads_it(tiny_sd):
    _, clip, _ = tiny_sd
    assert host.clip_load_device(clip) == clip.patcher.load_device


# -- ComfyUI 0.38's dynamic VRAM (tests/dynamic_vram_double.py; the paths that use it: tests/test_dynamic_vram.py) ---
@pytest.fixture
def loads(tiny_checkpoint_path, tiny_clip_vision_path):
    from dynamic_vram_double import DynamicLoads
    return DynamicLoads(tiny_checkpoint_path, tiny_clip_vision_path)


def test_resident_clone_makes_one_copy_per_loaded_model_that_its_later_clones_share(loads):
    model, _, _ = loads.checkpoint()
    first = host.resident_clone(model)
    lora = model.clone()  # what a LoRA loader downstream of the checkpoint gives: same loaded model, its own patches
    lora.add_patches({"diffusion_model.out.2.bias": (torch.zeros(4),)}, 0.5)
    second = host.resident_clone(lora)
    assert loads.reloads == {"model": 1}
    assert not first.is_dynamic() and first.model is not model.model and second.model is first.model
    assert list(second.patches) == ["diffusion_model.out.2.bias"] and not first.patches  # the caller's patches
    assert host.resident_clone(first).model is first.model and loads.reloads == {"model": 1}  # normal: plain clone


def test_the_resident_copy_is_released_with_the_loaded_model(loads):
    import gc
    import weakref
    model, _, _ = loads.checkpoint()
    copy = weakref.ref(host.resident_clone(model).model)
    gc.collect()
    assert copy() is not None  # kept for the next run while the loaded model lives
    del model
    gc.collect()
    assert copy() is None


def test_the_clip_clone_runs_the_resident_text_encoder(loads):
    _, clip, _ = loads.checkpoint()
    clone = host.resident_clone(clip)
    assert clone.cond_stage_model is clone.patcher.model  # the encoder that runs is the one loaded resident
    assert clone.cond_stage_model is not clip.cond_stage_model and not clone.patcher.is_dynamic()
    assert host.resident_clone(clip).cond_stage_model is clone.cond_stage_model and loads.reloads == {"clip": 1}
    assert clip.cond_stage_model is clip.patcher.model and clip.patcher.is_dynamic()  # the input is left as it was


def test_a_failing_reload_says_what_failed_and_names_the_switch(loads):
    model, _, _ = loads.checkpoint()
    loads.checkpoint_path = "/nonexistent/moved.safetensors"  # the file went away after loading
    with pytest.raises(RuntimeError, match=r"could not reload the MODEL .*--disable-dynamic-vram"):
        host.resident_clone(model, "the MODEL")
