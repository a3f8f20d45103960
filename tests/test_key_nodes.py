"""Fingerprints, key provenance and the key / clean-image nodes, called directly with ComfyUI-layout values.

Most models here are small real nn.Modules behind a holder with exactly the attributes fingerprint.py
reads from comfy.model_patcher.ModelPatcher (model, patches, patches_uuid, backup) and from comfy.sd.CLIP
(patcher); LoRA patches use the host's LoRAAdapter. What depends on a real checkpoint (tensors ComfyUI
adds that the file lacks, Make Key-I -> Save Key -> Load Key -> Recover) uses the tiny SD checkpoint.
"""
from __future__ import annotations

import collections
import copy
import re
import uuid
import zlib

import folder_paths
import numpy as np
import pytest
import torch
from comfy.weight_adapter.lora import LoRAAdapter
from PIL import Image

from diffprivacy.inversion import fingerprint as fp
from diffprivacy.inversion.fingerprint import clip_fingerprint, model_fingerprint
from diffprivacy.inversion.key_check import check_key_file, key_e_provenance, key_i_latent
from diffprivacy.inversion.key_e import KeyE
from diffprivacy.inversion.keyfile import is_sealed, key_bundle_metadata, read_key_file
from diffprivacy.nodes.common import list_key_files
from diffprivacy.nodes.key_nodes import DiffPrivacyLoadKey, DiffPrivacySaveImageClean, DiffPrivacySaveKey
from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI, DiffPrivacyRecover

Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # as ModelPatcher.backup stores


class PatcherLike:
    """The attributes of comfy.model_patcher.ModelPatcher that fingerprints read."""

    def __init__(self, model, patches=None, backup=None):
        self.model, self.patches, self.backup = model, dict(patches or {}), backup if backup is not None else {}
        self.patches_uuid = uuid.uuid4()

    def clone(self):
        n = PatcherLike(self.model, {k: list(v) for k, v in self.patches.items()}, self.backup)
        n.patches_uuid = self.patches_uuid
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):  # ModelPatcher.add_patches' layout
        for key, value in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
        self.patches_uuid = uuid.uuid4()


class ClipLike:
    def __init__(self, module):
        self.cond_stage_model, self.patcher = module, PatcherLike(module)


def tiny_net(seed, width=48):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                              torch.nn.LayerNorm(width))
    net.requires_grad_(False)
    return net


# ---------------------------------------------------------------- fingerprints

def test_fingerprint_same_weights_same_print_on_any_dtype():
    a = PatcherLike(tiny_net(0))
    reload = copy.deepcopy(a.model)  # a second load of the same file
    fp16, bf16 = copy.deepcopy(a.model).half(), copy.deepcopy(a.model).to(torch.bfloat16)
    prints = {model_fingerprint(PatcherLike(m)) for m in (a.model, reload, fp16, bf16)}
    assert len(prints) == 1
    assert next(iter(prints)).startswith("dp2-") and len(next(iter(prints))) == 20


def test_fingerprint_differs_for_other_weights_and_small_fine_tunes():
    base = tiny_net(0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)  # ~1% of the weights' scale
    prints = {model_fingerprint(PatcherLike(m)) for m in (base, tiny_net(1), tuned)}
    assert len(prints) == 3
    assert model_fingerprint(PatcherLike(base)) != clip_fingerprint(ClipLike(base))  # kinds never collide


def test_fingerprint_covers_lora_patches_and_reads_originals_when_patched_in_place():
    base = PatcherLike(tiny_net(0))
    before = model_fingerprint(base)
    key = "2.weight"
    g = torch.Generator().manual_seed(3)
    lora = LoRAAdapter({key}, (torch.randn(48, 4, generator=g), torch.randn(4, 48, generator=g), 4.0, None, None,
                               None))
    patched = base.clone()
    patched.add_patches({key: lora}, strength_patch=0.8)
    weaker = base.clone()
    weaker.add_patches({key: lora}, strength_patch=0.5)
    with_lora = model_fingerprint(patched)
    assert len({before, with_lora, model_fingerprint(weaker)}) == 3
    assert model_fingerprint(base) == before  # the clone's patches do not leak into the base

    # ComfyUI applies patches in place and keeps the original in the shared backup.
    weight = base.model.state_dict()[key]
    base.backup[key] = Backup(weight.clone(), True)
    with torch.no_grad():
        weight.neg_()
    fp._weights_digest_cache.clear()
    assert model_fingerprint(base) == before and model_fingerprint(patched) == with_lora


def test_fingerprint_is_cached_per_model(monkeypatch):
    patcher = PatcherLike(tiny_net(0))
    first = model_fingerprint(patcher)
    calls = []
    monkeypatch.setattr(fp, "_sign_bits", lambda *a: calls.append(a) or b"")
    assert model_fingerprint(patcher) == first and model_fingerprint(patcher.clone()) == first
    assert calls == []
    fp._weights_digest_cache.clear()
    model_fingerprint(patcher)
    assert calls  # recomputed once the cache is gone


# ---------------------------------------------------------------- key nodes

@pytest.fixture
def output_dir(tmp_path):
    old_out, old_in = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    out, inp = tmp_path / "output", tmp_path / "input"
    out.mkdir()
    inp.mkdir()
    folder_paths.set_output_directory(str(out))
    folder_paths.set_input_directory(str(inp))
    yield out
    folder_paths.set_output_directory(old_out)
    folder_paths.set_input_directory(old_in)


def comfy_keys(seed=0, h=8, w=12, model=None, clip=None, steps=50):
    """Key-I and Key-E as Make Key-I and Learn Key-E give them: carrying the fingerprints of ``model`` / ``clip``."""
    g = torch.Generator().manual_seed(seed)
    model_print = model_fingerprint(model) if model is not None else None
    clip_print = clip_fingerprint(clip) if clip is not None else None
    latent = key_i_latent(torch.randn(1, 4, h, w, generator=g), steps=steps, sigma=14.6, model_fingerprint=model_print,
                          clip_fingerprint=clip_print)
    stages = torch.randn(10, 77, 32, generator=g)
    key_e = KeyE.from_stages(stages, torch.randn(10, 32, generator=g))
    return latent, key_e.with_provenance(key_e_provenance(model_print, clip_print)).to_conditioning()


def save_key(model, clip, password="", seed=0, **kw):
    key_i, key_e = comfy_keys(seed, model=model, clip=clip)
    args = dict(key_i=key_i, key_e=key_e, model=model, clip=clip, steps=50, tau=0.4, strength=0.6,
                filename_prefix="diffprivacy/key", password=password)
    args.update(kw)
    return DiffPrivacySaveKey().save(**args), key_i, key_e


def test_save_then_load_sealed_key(output_dir):
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    out, key_i, key_e = save_key(model, clip, password="s3cret")
    (path,) = out["result"]
    assert path == str(output_dir / "diffprivacy" / "key_00001_.safetensors")
    assert is_sealed(path) and out["ui"]["text"][0] == "key_00001_.safetensors (sealed with the password)"
    metadata = read_key_file(path, "s3cret")[1]
    assert (metadata["image_width"], metadata["image_height"]) == ("96", "64")  # latent 8x12, times 8

    assert DiffPrivacyLoadKey.INPUT_TYPES()["required"]["key_file"][0] == ["key_00001_.safetensors"]
    latent, cond, steps, tau, strength = DiffPrivacyLoadKey().load("key_00001_.safetensors", "s3cret",
                                                                   model=model, clip=clip)
    assert torch.equal(latent["samples"], key_i["samples"])
    assert len(cond) == 1 and torch.equal(cond[0][0], key_e[0][0]) and cond[0][0].shape == (10, 77, 32)
    assert torch.equal(cond[0][1]["pooled_output"], key_e[0][1]["pooled_output"])
    assert (steps, tau, strength) == (50, 0.4, 0.6)
    with pytest.raises(ValueError, match="wrong password or tampered key file"):
        DiffPrivacyLoadKey().load("key_00001_.safetensors", "guess")


def test_save_refuses_a_step_count_other_than_the_key_i_was_made_with(output_dir):
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    key_i, key_e = comfy_keys()
    key_i["diffprivacy_key_i"] = {"steps": 100, "sigma": 3.0}  # as Make Key-I records it
    with pytest.raises(ValueError, match="made with 100 DDIM steps"):
        DiffPrivacySaveKey().save(key_i, key_e, model, clip, 50, 0.4, 0.6, "diffprivacy/key", "")
    assert not list(output_dir.rglob("*.safetensors"))
    (path,) = DiffPrivacySaveKey().save(key_i, key_e, model, clip, 100, 0.4, 0.6, "diffprivacy/key", "")["result"]
    assert read_key_file(path)[1]["steps"] == "100"


def test_ten_entry_key_e_is_saved_like_a_batch_of_ten(output_dir):
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    key_i, key_e = comfy_keys(model=model, clip=clip, steps=30)
    ten = [[key_e[0][0][i:i + 1], {}] for i in range(10)]
    (path,) = DiffPrivacySaveKey().save(key_i, ten, model, clip, 30, 0.5, 0.8, "diffprivacy/ten", "")["result"]
    tensors, metadata = read_key_file(path)
    assert torch.equal(tensors["key_e"], key_e[0][0]) and "key_e_pooled" not in tensors
    assert metadata["steps"] == "30"


def test_load_refuses_another_model_or_text_encoder(output_dir):
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    (path,) = save_key(model, clip)[0]["result"]
    node = DiffPrivacyLoadKey()
    node.load("key_00001_.safetensors", "", model=model, clip=clip)
    with pytest.raises(ValueError, match="another diffusion model"):
        node.load("", "", key_path=path, model=PatcherLike(tiny_net(1)))
    with pytest.raises(ValueError, match="another text encoder"):
        node.load("key_00001_.safetensors", "", clip=ClipLike(tiny_net(6, width=32)))
    with pytest.raises(ValueError, match="not sealed"):
        node.load("key_00001_.safetensors", "a password")


def test_saving_twice_never_overwrites(output_dir):
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    first = save_key(model, clip, seed=0)[0]["result"][0]
    before = open(first, "rb").read()
    second = save_key(model, clip, seed=1)[0]["result"][0]
    assert first != second and open(first, "rb").read() == before
    assert list_key_files() == ["key_00001_.safetensors", "key_00002_.safetensors"]


def test_save_key_shows_the_name_load_key_lists_and_says_how_to_load_a_key_saved_elsewhere(output_dir):
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    out, _, _ = save_key(model, clip, filename_prefix="diffprivacy/trip/key")
    shown = out["ui"]["text"][0].split(" ")[0]
    assert shown == "trip/key_00001_.safetensors"
    assert shown in DiffPrivacyLoadKey.INPUT_TYPES()["required"]["key_file"][0]
    DiffPrivacyLoadKey().load(shown, "")  # what the node showed loads as it was shown
    with pytest.raises(ValueError, match="press R") as e:
        DiffPrivacyLoadKey().load("diffprivacy/" + shown, "")  # the output-relative name is not a listed one
    assert "trip/key_00001_.safetensors" in str(e.value)  # the names there are offered

    out, _, _ = save_key(model, clip, filename_prefix="elsewhere/key")
    assert out["ui"]["text"][0].startswith("elsewhere/key_00001_.safetensors (outside output/diffprivacy/")
    assert "key_path" in out["ui"]["text"][0]


def test_load_refuses_paths_outside_comfy_folders_and_bad_keys(output_dir, tmp_path):
    node = DiffPrivacyLoadKey()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    for kwargs, message in ((dict(key_file="../../elsewhere.safetensors"), "inside output/diffprivacy"),
                            (dict(key_file="", key_path=str(outside)), "inside ComfyUI's output or input"),
                            (dict(key_file=""), "no key file chosen"),
                            (dict(key_file="missing.safetensors"), "not found")):
        with pytest.raises(ValueError, match=message):
            node.load(password="", **kwargs)
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    flat = key_i_latent(torch.zeros(4, 8, 8), steps=50, sigma=None, model_fingerprint=None, clip_fingerprint=None)
    with pytest.raises(ValueError, match=r"LATENT of 1 image\(s\)"):
        DiffPrivacySaveKey().save(flat, comfy_keys()[1], model, clip, 50, 0.4, 0.6, "diffprivacy/key", "")
    with pytest.raises(ValueError, match="not a Key-I: connect the key_i output of Make Key-I or Load Key"):
        DiffPrivacySaveKey().save({"samples": torch.zeros(1, 4, 8, 8)}, comfy_keys()[1], model, clip, 50, 0.4, 0.6,
                                  "diffprivacy/key", "")
    assert list_key_files() == []


# ---------------------------------------------------------------- provenance: every key checked wherever it came from

def test_key_file_check_names_every_difference_and_what_to_set():
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    meta = key_bundle_metadata(steps=50, tau=0.4, strength=0.6, image_width=512, image_height=512,
                               model_fingerprint=model_fingerprint(model), clip_fingerprint=clip_fingerprint(clip))
    check_key_file(meta, model=model, clip=clip, steps=50, image_size=(512, 512))
    check_key_file(meta)  # nothing to check
    cases = [({"model": PatcherLike(tiny_net(1))}, "another diffusion model .*connect the checkpoint"),
             ({"clip": ClipLike(tiny_net(6, width=32))}, "another text encoder .*connect the text encoder"),
             ({"image_size": (768, 512)}, "512x512 images"),
             ({"steps": 100}, "50 sampling steps, not 100: set steps to 50")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_key_file(meta, **kwargs)
    with pytest.raises(ValueError) as err:  # every difference at once
        check_key_file(meta, **{k: v for kwargs, _ in cases for k, v in kwargs.items()})
    assert all(re.search(message, str(err.value)) for _, message in cases)
    with pytest.raises(ValueError, match="does not record its step count"):
        check_key_file({}, steps=50)


def test_older_key_files_keep_their_model_check_and_skip_the_uncheckable_text_encoder_print():
    model, clip = PatcherLike(tiny_net(0)), ClipLike(tiny_net(5, width=32))
    legacy = model_fingerprint(model, version=1)  # how dp1 key files recorded it: every tensor
    assert legacy.startswith("dp1-") and legacy != model_fingerprint(model)
    meta = {"model_fingerprint": legacy, "clip_fingerprint": "dp1-0000000000000000", "steps": "50"}
    check_key_file(meta, model=model, clip=clip)  # the dp1 text-encoder print hashed uninitialised memory
    with pytest.raises(ValueError, match="another diffusion model"):
        check_key_file(meta, model=PatcherLike(tiny_net(1)))


@pytest.fixture(scope="module")
def reloaded_sd(tiny_checkpoint_path):
    """The tiny checkpoint loaded a second time, with every tensor the file does not hold changed: CLIP's
    text_projection (uninitialised in ComfyUI 0.3.75, zero-filled in newer versions), logit_scale, and the
    noise schedule's buffers ComfyUI computes."""
    import comfy.sd
    with torch.inference_mode():
        model, clip = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False,
                                                            output_clip=True)[:2]
        for name, t in clip.patcher.model.state_dict().items():
            if "text_projection" in name or "logit_scale" in name:
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
        for t in model.model.model_sampling.buffers():
            t.mul_(-1.5)
    return model, clip


def test_fingerprints_ignore_tensors_a_checkpoint_file_does_not_hold(tiny_sd, reloaded_sd):
    (model, clip, _), (model2, clip2) = tiny_sd, reloaded_sd
    assert model.model is not model2.model and clip.patcher.model is not clip2.patcher.model
    assert model_fingerprint(model2) == model_fingerprint(model)
    assert clip_fingerprint(clip2) == clip_fingerprint(clip)
    # ... while the transformer's own weights count: changing one sampled weight's signs changes the print
    with torch.inference_mode():
        other = copy.deepcopy(clip2.patcher.model)
        name = sorted(n for n in other.state_dict() if "text_model" in n and n.endswith("weight"))[0]
        other.state_dict()[name].neg_()
    assert clip_fingerprint(ClipLike(other)) != clip_fingerprint(clip)


def test_a_key_saved_on_one_load_opens_where_text_projection_differs(tiny_sd, reloaded_sd, output_dir):
    (model, clip, _), (model2, clip2) = tiny_sd, reloaded_sd
    (path,) = save_key(model, clip)[0]["result"]
    key_i, key_e, steps, _, _ = DiffPrivacyLoadKey().load("", "", key_path=path, model=model2, clip=clip2)
    assert steps == 50 and key_i["samples"].shape == (1, 4, 8, 12)


def _patched(patcher_owner, part):
    """A clone of a MODEL / CLIP with a weight patch: same file, another model as far as keys go."""
    clone = patcher_owner.clone()
    patcher = getattr(clone, "patcher", clone)
    name = sorted(n for n in patcher.model.state_dict() if part in n and n.endswith("weight"))[0]
    clone.add_patches({name: (torch.zeros_like(patcher.model.state_dict()[name]),)}, 0.5)
    return clone


def test_recover_checks_keys_from_load_key_though_its_model_and_clip_are_not_wired(tiny_sd, output_dir):
    model, clip, vae = tiny_sd
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        key_e = KeyE.from_texts(clip, "a portrait photo").to_conditioning()
        (key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, key_e, vae, image, 50, resolution=64)
        (path,) = DiffPrivacySaveKey().save(key_i, key_e, model, clip, 50, 0.4, 0.6, "diffprivacy/key", "")["result"]
        loaded_i, loaded_e, steps, _, _ = DiffPrivacyLoadKey().load("", "", key_path=path)  # no model / clip
        recover = DiffPrivacyRecover().recover
        with pytest.raises(ValueError, match="made with 50 DDIM steps, not 25: set steps to 50"):
            recover(model, loaded_e, loaded_i, 25)
        with pytest.raises(ValueError, match="another diffusion model"):
            recover(_patched(model, "diffusion_model"), loaded_e, loaded_i, steps)
        other_e = KeyE.from_texts(_patched(clip, "text_model"), "a portrait photo").to_conditioning()
        with pytest.raises(ValueError, match="another text encoder than the Key-E Key-I was made under"):
            recover(model, other_e, loaded_i, steps)
        resized = {**loaded_i, "samples": torch.nn.functional.interpolate(loaded_i["samples"], scale_factor=2)}
        with pytest.raises(ValueError, match="made for 64x64 images but holds a latent of a 128x128 image"):
            recover(model, loaded_e, resized, steps)
        with pytest.raises(ValueError, match="not a Key-I"):
            recover(model, loaded_e, {"samples": loaded_i["samples"]}, steps)
        from_file, _ = recover(model, loaded_e, loaded_i, steps)
        in_memory, _ = recover(model, key_e, key_i, 50)
    torch.testing.assert_close(from_file["samples"], in_memory["samples"])


def test_save_key_refuses_keys_made_with_another_model_or_text_encoder(tiny_sd, output_dir):
    model, clip, _ = tiny_sd
    key_i, key_e = comfy_keys(model=model, clip=clip)
    with pytest.raises(ValueError, match="Key-I was made for another diffusion model"):
        DiffPrivacySaveKey().save(key_i, key_e, _patched(model, "diffusion_model"), clip, 50, 0.4, 0.6,
                                  "diffprivacy/key", "")
    with pytest.raises(ValueError, match="Key-E was made with another text encoder"):
        DiffPrivacySaveKey().save(key_i, key_e, model, _patched(clip, "text_model"), 50, 0.4, 0.6,
                                  "diffprivacy/key", "")
    assert list_key_files() == []


# ---------------------------------------------------------------- clean image saving

def png_chunk_types(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        assert zlib.crc32(kind + data[pos + 8:pos + 8 + length]) == int.from_bytes(
            data[pos + 8 + length:pos + 12 + length], "big")
        types.append(kind)
        pos += 12 + length
    return types


WORKFLOW = {"1": {"class_type": "LoadImage", "inputs": {"image": "alice_portrait.jpg"}},
            "2": {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_file": "key_00007_.safetensors",
                                                                 "password": "hunter2"}}}


def test_clean_save_writes_no_metadata_and_no_original_name(output_dir):
    images = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(0))
    ui = DiffPrivacySaveImageClean().save_images(images, "diffprivacy/protected", prompt=WORKFLOW)["ui"]["images"]
    assert [r["filename"] for r in ui] == ["protected_00001_.png", "protected_00002_.png"]
    for i, r in enumerate(ui):
        path = output_dir / r["subfolder"] / r["filename"]
        data = path.read_bytes()
        assert set(png_chunk_types(data)) == {b"IHDR", b"IDAT", b"IEND"}
        for leak in (b"alice", b"hunter2", b"key_0000", b"workflow", b"prompt"):
            assert leak not in data
        with Image.open(path) as img:
            assert img.info == {} and img.text == {} and img.getexif() == {}
            expected = np.clip(255.0 * images[i].numpy(), 0, 255).astype(np.uint8)
            assert np.array_equal(np.asarray(img), expected)
        assert "alice" not in r["filename"]


def test_clean_save_refuses_a_prefix_naming_the_original(output_dir):
    images = torch.rand(1, 8, 8, 3)
    with pytest.raises(ValueError, match="alice_portrait"):
        DiffPrivacySaveImageClean().save_images(images, "faces/alice_portrait_protected", prompt=WORKFLOW)
    assert not any(output_dir.rglob("*.png"))


def test_nodes_are_registered_with_tooltips():
    from diffprivacy.nodes import DISABLED, NODE_CLASS_MAPPINGS

    assert "key_nodes" not in DISABLED
    for node_id in ("DiffPrivacySaveKey", "DiffPrivacyLoadKey", "DiffPrivacySaveImageClean"):
        spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (_, *opts) in spec.get(section, {}).items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
