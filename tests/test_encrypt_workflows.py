"""The shipped Stage II/III workflows, end to end in a live ComfyUI on the tiny checkpoint.

The shipped files keep the paper's settings for a real SD 1.5; each test shrinks the work in the API
prompt only: the photo is scaled to 128x128 and S (the shared steps primitive) set to 10.

What "recovered" means on a tiny model with RANDOM weights: its VAE does not reproduce a photo, so
neither the recovered nor the protected images look like the original. What is robust is that
recovery undoes the protection up to DDIM-inversion error: the recovered image is (much) closer to
the VAE's reconstruction of the original (encode -> decode, added to the prompt here as a preview)
than the protected images are, and no farther from the original photo than they are.
"""
import io
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import nodes_of

SIZE, STEPS = 128, 10


def _only(api, class_type):
    (nid,) = [nid for nid, n in api.items() if n["class_type"] == class_type]
    return nid


def _shrink(api, size=SIZE, steps=STEPS):
    """Scale the loaded photo to size x size, set the shared working resolution to ``size`` and the shared
    steps primitive to ``steps``."""
    load = _only(api, "LoadImage")
    api["9001"] = {"class_type": "ImageScale", "inputs": {"image": [load, 0], "upscale_method": "area",
                                                          "width": size, "height": size, "crop": "center"}}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if nid != "9001" and value == [load, 0]:
                node["inputs"][name] = ["9001", 0]
    resolution = {v[0] for n in api.values() for k, v in n["inputs"].items()
                  if k == "resolution" and isinstance(v, list)}  # the primitive(s) wired to a resolution input
    for nid, node in api.items():
        if node["class_type"] == "PrimitiveInt":
            node["inputs"]["value"] = size if nid in resolution else steps
    return api


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def png_chunks(png: bytes) -> list[str]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kinds.append(png[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return kinds


def _saved_key(entry, api):
    """The key file SaveKey wrote, relative to the output folder (its UI text starts with it)."""
    (text,) = entry["outputs"][_only(api, "DiffPrivacySaveKey")]["text"]
    return text.split(" ")[0]


def _preview(api, nid, image):
    api[nid] = {"class_type": "PreviewImage", "inputs": {"images": image}}


@pytest.fixture(scope="module")
def text_key_run(comfy_server, workflow_api):
    """anonymize-text-key at 128x128, S = 10, sealed with a password; previews of the original and its
    VAE reconstruction added."""
    api = _shrink(workflow_api("anonymize-text-key"))
    nodes_of(api, "DiffPrivacySaveKey")[0]["inputs"]["password"] = "correct horse"
    ckpt = _only(api, "CheckpointLoaderSimple")
    api["9005"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["9001", 0], "vae": [ckpt, 2]}}
    api["9002"] = {"class_type": "VAEDecode", "inputs": {"samples": ["9005", 0], "vae": [ckpt, 2]}}
    _preview(api, "9003", ["9001", 0])
    _preview(api, "9004", ["9002", 0])
    entry = comfy_server.run(api, timeout=300)
    return api, entry


def test_anonymize_text_key_saves_four_clean_images_and_a_sealed_key(comfy_server, text_key_run):
    api, entry = text_key_run
    protected = comfy_server.output_images(entry, _only(api, "DiffPrivacySaveImageClean"))
    assert len(protected) == 4
    for png in protected:
        assert set(png_chunks(png)) == {"IHDR", "IDAT", "IEND"}  # no tEXt/iTXt/zTXt: no metadata
        assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)
    outs = [_pixels(p) for p in protected]
    assert min(_mse(outs[i], outs[j]) for i in range(4) for j in range(i + 1, 4)) > 1e-5  # four different noisings
    key = comfy_server.base / "output" / _saved_key(entry, api)
    assert key.is_file() and b"correct horse" not in key.read_bytes()


def test_recover_needs_the_password_and_undoes_the_protection(comfy_server, workflow_api, text_key_run):
    protect_api, protect_entry = text_key_run
    api = workflow_api("recover")
    load = nodes_of(api, "DiffPrivacyLoadKey")[0]["inputs"]
    load.update(key_path=_saved_key(protect_entry, protect_api), password="wrong horse")
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = next(d for kind, d in entry["status"]["messages"] if kind == "execution_error")
    assert error["node_type"] == "DiffPrivacyLoadKey" and "password" in error["exception_message"].lower()
    assert not comfy_server.output_images(entry)

    load["password"] = "correct horse"  # the server keeps serving after the error
    entry = comfy_server.run(api, timeout=120)
    (recovered_png,) = comfy_server.output_images(entry, _only(api, "DiffPrivacySaveImageClean"))
    assert set(png_chunks(recovered_png)) == {"IHDR", "IDAT", "IEND"}
    recovered = _pixels(recovered_png)
    original, = [_pixels(p) for p in comfy_server.output_images(protect_entry, "9003")]
    reconstruction, = [_pixels(p) for p in comfy_server.output_images(protect_entry, "9004")]
    protected = [_pixels(p) for p in comfy_server.output_images(protect_entry,
                                                                _only(protect_api, "DiffPrivacySaveImageClean"))]
    assert recovered.shape == original.shape
    # recovery undoes the protection: far closer to the VAE's reconstruction than any protected image ...
    assert _mse(recovered, reconstruction) < 0.25 * min(_mse(p, reconstruction) for p in protected)
    # ... and so closer to the original photo too
    assert _mse(recovered, original) < min(_mse(p, original) for p in protected)


@pytest.fixture(scope="module")
def key_e_file(comfy_server, workflow_api):
    """A Key-E file from the shipped learn-key-e workflow, 2 training steps at 64x64."""
    api = workflow_api("learn-key-e")
    learn = nodes_of(api, "DiffPrivacyLearnKeyE")[0]["inputs"]
    learn.update(steps=2, resolution=64, checkpoint_every=0)
    entry = comfy_server.run(api, timeout=120)
    (text,) = entry["outputs"][_only(api, "DiffPrivacyLearnKeyE")]["text"]
    folder = learn["filename_prefix"].rsplit("/", 1)[0]
    return f"{folder}/{text.split(':')[0]}"


@pytest.mark.parametrize("name, outputs", [("anonymize", 2), ("hide", 1)])
def test_protect_with_a_learnt_key_e_then_recover(comfy_server, workflow_api, key_e_file, name, outputs):
    api = _shrink(workflow_api(name))
    task = nodes_of(api, {"anonymize": "DiffPrivacyAnonymize", "hide": "DiffPrivacyHide"}[name])[0]["inputs"]
    task["num_outputs"] = outputs
    nodes_of(api, "DiffPrivacyLoadKeyE")[0]["inputs"]["key_path"] = key_e_file
    entry = comfy_server.run(api, timeout=300)
    protected = comfy_server.output_images(entry, _only(api, "DiffPrivacySaveImageClean"))
    assert len(protected) == outputs
    assert all(set(png_chunks(p)) == {"IHDR", "IDAT", "IEND"} for p in protected)

    rec_api = workflow_api("recover")
    nodes_of(rec_api, "DiffPrivacyLoadKey")[0]["inputs"]["key_path"] = _saved_key(entry, api)
    rec = comfy_server.run(rec_api, timeout=120)
    (png,) = comfy_server.output_images(rec, _only(rec_api, "DiffPrivacySaveImageClean"))
    assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)
