"""The shipped Stage II/III workflows, end to end in a live ComfyUI on the tiny checkpoint.

The shipped files keep the paper's settings for a real SD 1.5; each test shrinks the work in the API
prompt only: the photo is scaled to 128x128 and S (the shared steps primitive) set to 10.

What "recovered" means on a tiny model with RANDOM weights: its VAE does not reproduce a photo, so
neither the recovered nor the protected faces look like the original. What is robust: the workflows
protect the face crop and paste it back, so the protected photo keeps the original's pixels outside the
face's mask; Recover pastes the recovered face into the protected photo (the recover workflow loads it as
input/protected.png), so the recovered photo has the photo's size and differs from the protected one
only where the face was pasted.
"""
import io

import pytest
from PIL import Image

from conftest import nodes_of
from workflow_helpers import add_preview, mse, only, pixels, png_chunks, saved_key, shown_key_name, shrink

SIZE, STEPS = 128, 10


@pytest.fixture(scope="module")
def text_key_run(comfy_server, workflow_api):
    """anonymize-text-key at 128x128, S = 10, sealed with a password; previews of the original and its
    VAE reconstruction added."""
    api = shrink(workflow_api("anonymize-text-key"), SIZE, STEPS)
    nodes_of(api, "DiffPrivacySaveKey")[0]["inputs"]["password"] = "correct horse"
    ckpt = only(api, "CheckpointLoaderSimple")
    api["9005"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["9001", 0], "vae": [ckpt, 2]}}
    api["9002"] = {"class_type": "VAEDecode", "inputs": {"samples": ["9005", 0], "vae": [ckpt, 2]}}
    add_preview(api, "9003", ["9001", 0])
    add_preview(api, "9004", ["9002", 0])
    entry = comfy_server.run(api, timeout=300)
    return api, entry


def test_anonymize_text_key_saves_four_clean_images_and_a_sealed_key(comfy_server, text_key_run):
    api, entry = text_key_run
    protected = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    assert len(protected) == 4
    for png in protected:
        assert set(png_chunks(png)) == {"IHDR", "IDAT", "IEND"}  # no tEXt/iTXt/zTXt: no metadata
        assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)
    outs = [pixels(p) for p in protected]
    assert min(mse(outs[i], outs[j]) for i in range(4) for j in range(i + 1, 4)) > 1e-5  # four different noisings
    key = comfy_server.base / "output" / saved_key(entry, api)
    assert key.is_file() and b"correct horse" not in key.read_bytes()


def _protected_as_input(comfy_server, png: bytes) -> None:
    (comfy_server.base / "input" / "protected.png").write_bytes(png)


def test_recover_needs_the_password_and_pastes_the_recovered_face_into_the_protected_photo(
        comfy_server, workflow_api, text_key_run):
    """Recover picks the key by the name Save Key showed, from Load Key's list as the server offers it now
    (what pressing R in the canvas fetches): one name for the key file everywhere."""
    import numpy as np
    protect_api, protect_entry = text_key_run
    shown = shown_key_name(protect_entry, protect_api)
    listed = comfy_server.get_json("/object_info/DiffPrivacyLoadKey")["DiffPrivacyLoadKey"]["input"]["required"]
    assert shown in listed["key_file"][0], f"Save Key showed {shown!r}; Load Key lists {listed['key_file'][0]}"
    protected_png = comfy_server.output_images(protect_entry, only(protect_api, "DiffPrivacySaveImageClean"))[0]
    _protected_as_input(comfy_server, protected_png)
    api = workflow_api("recover")
    load = nodes_of(api, "DiffPrivacyLoadKey")[0]["inputs"]
    load.update(key_file=shown, key_path="", password="wrong horse")
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = next(d for kind, d in entry["status"]["messages"] if kind == "execution_error")
    assert error["node_type"] == "DiffPrivacyLoadKey" and "password" in error["exception_message"].lower()
    assert not comfy_server.output_images(entry)

    load["password"] = "correct horse"  # the server keeps serving after the error
    entry = comfy_server.run(api, timeout=120)
    (recovered_png,) = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    assert set(png_chunks(recovered_png)) == {"IHDR", "IDAT", "IEND"}
    recovered = pixels(recovered_png)
    original, = [pixels(p) for p in comfy_server.output_images(protect_entry, "9003")]
    protected = pixels(protected_png)
    assert recovered.shape == original.shape == protected.shape           # the photo's own size
    same_as_original = np.all(protected == original, axis=-1)             # outside the face's mask
    assert 0.2 < same_as_original.mean() < 0.98
    assert np.array_equal(recovered[same_as_original], protected[same_as_original])
    assert mse(recovered, protected) > 1e-5                               # the face was pasted back


@pytest.fixture(scope="module")
def key_e_file(comfy_server, workflow_api):
    """A Key-E file from the shipped learn-key-e workflow, 2 training steps at 64x64."""
    api = workflow_api("learn-key-e")
    learn = nodes_of(api, "DiffPrivacyLearnKeyE")[0]["inputs"]
    learn.update(steps=2, resolution=64, checkpoint_every=0)
    entry = comfy_server.run(api, timeout=120)
    (text,) = entry["outputs"][only(api, "DiffPrivacyLearnKeyE")]["text"]
    folder = learn["filename_prefix"].rsplit("/", 1)[0]
    return f"{folder}/{text.split(':')[0]}"


@pytest.mark.parametrize("name, outputs", [("anonymize", 2), ("hide", 1)])
def test_protect_with_a_learnt_key_e_then_recover(comfy_server, workflow_api, key_e_file, name, outputs):
    api = shrink(workflow_api(name), SIZE, STEPS)
    task = nodes_of(api, {"anonymize": "DiffPrivacyAnonymize", "hide": "DiffPrivacyHide"}[name])[0]["inputs"]
    task["num_outputs"] = outputs
    nodes_of(api, "DiffPrivacyLoadKeyE")[0]["inputs"]["key_path"] = key_e_file
    entry = comfy_server.run(api, timeout=300)
    protected = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    assert len(protected) == outputs
    assert all(set(png_chunks(p)) == {"IHDR", "IDAT", "IEND"} for p in protected)

    _protected_as_input(comfy_server, protected[0])
    rec_api = workflow_api("recover")
    nodes_of(rec_api, "DiffPrivacyLoadKey")[0]["inputs"]["key_path"] = saved_key(entry, api)
    rec = comfy_server.run(rec_api, timeout=120)
    (png,) = comfy_server.output_images(rec, only(rec_api, "DiffPrivacySaveImageClean"))
    assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)


def test_fast_preset_names_the_missing_tiny_decoder_then_runs_through_it(comfy_server, workflow_api, tmp_path):
    """anonymize-fast: without models/vae_approx/taesd_decoder.* the run stops with an error naming the folder and
    the file (nothing saved, the server keeps serving); with the file the gradient goes through the tiny decoder
    (the server log says which decoder ran) and the outputs are saved as usual."""
    from tiny_models import build_taesd_decoder
    api = shrink(workflow_api("anonymize-fast"), SIZE, STEPS)
    nodes_of(api, "DiffPrivacyAnonymize")[0]["inputs"]["num_outputs"] = 1
    options = nodes_of(api, "DiffPrivacyGradientOptions")[0]["inputs"]
    assert options["gradient_decoder"] == "tiny" and options["face_window"] is True
    assert not any((comfy_server.base / "models" / "vae_approx").glob("taesd_decoder*"))  # only this test adds it
    entry = comfy_server.run(api, timeout=300, expect_error=True)
    error = next(d for kind, d in entry["status"]["messages"] if kind == "execution_error")
    assert "vae_approx" in error["exception_message"] and "taesd_decoder" in error["exception_message"]
    assert not comfy_server.output_images(entry)
    comfy_server.put_model("vae_approx", "taesd_decoder.safetensors",
                           build_taesd_decoder(tmp_path / "taesd_decoder.safetensors"))
    entry = comfy_server.run(api, timeout=300)
    (png,) = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    assert set(png_chunks(png)) == {"IHDR", "IDAT", "IEND"}
    assert "gradient decoder: tiny (taesd_decoder.safetensors)" in comfy_server.log_tail(200_000)
