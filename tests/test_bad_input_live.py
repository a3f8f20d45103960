"""Bad input in a live server: no face, several faces, RGBA / grayscale / odd-sized images, corrupted key files.

Each case runs the shipped anonymize-text-key or recover workflow, shrunk in the API prompt only (a small
input image, the shared working resolution at 64 or 0, S = 4, one output). A bad input must end in an
execution error that says what is wrong, save nothing, leave the files it was given as they were, and leave
the server serving.
"""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, nodes_of
from face_fixtures import small_face_image
from comfy_server import execution_error
from workflow_helpers import only, saved_key

STEPS = 4


def _anonymize(workflow_api, image: str, resolution: int = 64, seed: int = 0) -> dict:
    """anonymize-text-key on input/<image> at the given working resolution, S = STEPS, one output."""
    api = workflow_api("anonymize-text-key")
    nodes_of(api, "LoadImage")[0]["inputs"]["image"] = image
    task = nodes_of(api, "DiffPrivacyAnonymize")[0]["inputs"]
    task.update(num_outputs=1, seed=seed)
    for nid, node in api.items():
        if node["class_type"] == "PrimitiveInt":
            node["inputs"]["value"] = resolution if [nid, 0] == task["resolution"] else STEPS
    return api


def _put(comfy_server, name: str, image: Image.Image) -> str:
    image.save(comfy_server.base / "input" / name)
    return name


def _protected(comfy_server, entry, api) -> list[Image.Image]:
    pngs = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    return [Image.open(io.BytesIO(p)) for p in pngs]


def _face(size=(96, 96)) -> Image.Image:
    return small_face_image(SHARED / "data" / "photos" / "obama.jpg", 256).resize(size, Image.LANCZOS)


def _gray() -> Image.Image:
    return Image.new("RGB", (96, 96), (128, 128, 128))


def _landscape() -> Image.Image:
    """Sky fading to a horizon, green ground below: an outdoor photo's layout, no face."""
    y = np.linspace(0.0, 1.0, 96)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 230]) + y * np.array([220, 230, 240])
    ground = np.array([60, 120, 40]) + 30 * np.sin(np.linspace(0, 12, 96))[None, :, None]
    pixels = np.where(y < 0.55, sky, ground) * np.ones((96, 96, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("make", [_gray, _landscape], ids=["flat-gray", "landscape"])
def test_an_image_without_a_face_is_refused_with_a_clear_error(comfy_server, workflow_api, make):
    api = _anonymize(workflow_api, _put(comfy_server, f"noface-{make.__name__}.png", make()))
    keys = comfy_server.base / "output" / "diffprivacy"
    keys_before = sorted(keys.glob("key_*.safetensors"))
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = execution_error(entry)
    assert error["node_type"] == "DiffPrivacyAnonymize", error
    message = error["exception_message"].lower()
    assert "no face was detected in image 0" in message, message
    assert not _protected(comfy_server, entry, api)
    # Save Key waits for the protected images: a failed protection leaves no key behind
    assert sorted(keys.glob("key_*.safetensors")) == keys_before
    assert comfy_server.alive()


def test_a_group_photo_is_protected_in_one_run(comfy_server, workflow_api):
    """A group photo runs through the shipped workflow in one run, every detected face steered (faces = all, the
    default; tests/test_group_guidance.py checks that each face receives gradient)."""
    group = Image.open(SHARED / "data" / "photos" / "group-6-faces.jpg").convert("RGB").resize((320, 224))
    api = _anonymize(workflow_api, _put(comfy_server, "group.png", group), resolution=0)
    face_model = [only(api, "DiffPrivacyFaceModelLoader"), 0]
    api["9101"] = {"class_type": "DiffPrivacyFaceAnalyze", "inputs": {
        "face_model": face_model, "image": [only(api, "LoadImage"), 0], "face": "all", "face_index": 0,
        "if_no_face": "error"}}
    api["9102"] = {"class_type": "PreviewImage", "inputs": {"images": ["9101", 1]}}  # one crop per face
    entry = comfy_server.run(api, timeout=180)
    assert len(comfy_server.output_images(entry, "9102")) >= 2  # several faces really are found at this size
    (protected,) = _protected(comfy_server, entry, api)
    assert protected.size == (320, 224)
    assert api[only(api, "DiffPrivacyAnonymize")]["inputs"].get("faces", "all") == "all"


def _rgba() -> Image.Image:
    face = _face().convert("RGBA")
    face.putalpha(Image.linear_gradient("L").resize(face.size))  # transparent at the top, opaque at the bottom
    return face


@pytest.mark.parametrize("make, mode, resolution, size", [
    (_rgba, "RGBA", 64, (96, 96)),                    # the photo keeps its size: its face crop works at 64
    (lambda: _face().convert("L"), "L", 64, (96, 96)),
    (lambda: _face((97, 131)), "RGB", 0, (97, 131)),  # 0: the crop at its own size (a multiple of 8)
], ids=["rgba", "grayscale", "odd-size"])
def test_rgba_grayscale_and_odd_sized_images_are_protected(comfy_server, workflow_api, make, mode, resolution, size):
    image = make()
    assert image.mode == mode
    name = _put(comfy_server, f"face-{mode}-{image.width}x{image.height}.png", image)
    api = _anonymize(workflow_api, name, resolution=resolution)
    entry = comfy_server.run(api, timeout=120)
    (protected,) = _protected(comfy_server, entry, api)
    assert protected.size == size and protected.mode == "RGB"
    assert (comfy_server.base / "output" / saved_key(entry, api)).is_file()


@pytest.fixture(scope="module")
def real_key(comfy_server, workflow_api):
    """A key file written by a normal anonymize-text-key run (relative to the output folder)."""
    _put(comfy_server, "face-64.png", _face((64, 64)))
    api = _anonymize(workflow_api, "face-64.png")
    entry = comfy_server.run(api, timeout=120)
    (png,) = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    (comfy_server.base / "input" / "protected.png").write_bytes(png)  # the recover workflow pastes into it
    return saved_key(entry, api)


def _recover(workflow_api, **load):
    api = workflow_api("recover")
    nodes_of(api, "DiffPrivacyLoadKey")[0]["inputs"].update(load)
    return api


def test_a_corrupted_key_file_is_refused_naming_the_file_and_nothing_is_lost(comfy_server, workflow_api, real_key):
    folder = comfy_server.base / "output" / "diffprivacy"
    good = comfy_server.base / "output" / real_key
    data = good.read_bytes()
    truncated = folder / "truncated_00001_.safetensors"
    truncated.write_bytes(data[:len(data) // 2])
    garbage = folder / "garbage_00001_.safetensors"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))

    for load in ({"key_path": f"diffprivacy/{truncated.name}"}, {"key_file": garbage.name}):
        before = {p: p.read_bytes() for p in (good, truncated, garbage)}
        api = _recover(workflow_api, **load)
        entry = comfy_server.run(api, timeout=120, expect_error=True)
        error = execution_error(entry)
        assert error["node_type"] == "DiffPrivacyLoadKey", error
        name = (truncated if "key_path" in load else garbage).name
        assert name in error["exception_message"] and "key file" in error["exception_message"], error
        assert not comfy_server.output_images(entry)
        assert {p: p.read_bytes() for p in before} == before  # nothing deleted or rewritten

    entry = comfy_server.run(_recover(workflow_api, key_path=real_key), timeout=120)
    (png,) = comfy_server.output_images(entry)
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_after_all_the_bad_input_the_server_still_protects_a_photo(comfy_server, workflow_api, real_key):
    api = _anonymize(workflow_api, "face-64.png", seed=1)  # a new seed: run again, not answered from the cache
    entry = comfy_server.run(api, timeout=120)
    (protected,) = _protected(comfy_server, entry, api)
    assert protected.size == (64, 64)
    assert comfy_server.alive()


def test_a_nan_setting_posted_through_the_api_fails_naming_it_and_saves_no_key(comfy_server, workflow_api):
    """ComfyUI's min/max checks let NaN through and its API accepts NaN in JSON: it used to give a "successful" run
    with a black image and a saved key."""
    api = _anonymize(workflow_api, _put(comfy_server, "nan-face.png", _face()))
    api[only(api, "DiffPrivacyAnonymize")]["inputs"]["diversity_weight"] = float("nan")
    keys = comfy_server.base / "output" / "diffprivacy"
    keys_before = sorted(keys.glob("key_*.safetensors"))
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = execution_error(entry)
    assert error["node_type"] == "DiffPrivacyAnonymize", error
    assert "diversity_weight is nan" in error["exception_message"], error
    assert not _protected(comfy_server, entry, api)
    assert sorted(keys.glob("key_*.safetensors")) == keys_before
    assert comfy_server.alive()
