"""The host-compatibility layer (guidance/host.py): today's ComfyUI 0.38 paths where they exist, 0.3.75's otherwise."""
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
