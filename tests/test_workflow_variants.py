"""The workflows that learn Key-E first (issue #5), live on the tiny checkpoint: one run learns Key-E,
protects with it and writes the key file, and the shipped recover workflow reads that key file.

Shrunk in the API prompt only: the photo and the shared working resolution (which Learn Key-E shares too)
at 64x64, S = 10, 2 Key-E training steps, 2 outputs.
"""
import io

import pytest
from PIL import Image

from conftest import nodes_of
from workflow_helpers import only, png_chunks, saved_key, shrink

SIZE, STEPS, LEARN_STEPS = 64, 10, 2
TASKS = {"anonymize-learn-key-e": ("DiffPrivacyAnonymize", 2), "hide-learn-key-e": ("DiffPrivacyHide", 1)}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_learn_key_e_then_protect_then_recover_from_its_key_file(comfy_server, workflow_api, name):
    task, outputs = TASKS[name]
    api = shrink(workflow_api(name), size=SIZE, steps=STEPS)
    learn_id = only(api, "DiffPrivacyLearnKeyE")
    learn = api[learn_id]["inputs"]
    learn.update(steps=LEARN_STEPS, checkpoint_every=0)
    assert isinstance(learn["resolution"], list)  # on the shared working-resolution primitive, set to SIZE
    assert nodes_of(api, task)[0]["inputs"]["key_e"] == [learn_id, 0]
    assert api[learn["image"][0]]["class_type"] == "DiffPrivacyFaceCrops"  # Key-E learnt on the face crop
    nodes_of(api, task)[0]["inputs"]["num_outputs"] = outputs
    entry = comfy_server.run(api, timeout=300)

    protected = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    assert len(protected) == outputs
    for png in protected:
        assert set(png_chunks(png)) == {"IHDR", "IDAT", "IEND"}
        assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)

    (text,) = entry["outputs"][learn_id]["text"]  # "<file>: <n> steps, last loss ..."
    assert f": {LEARN_STEPS} steps" in text
    key_e_file = comfy_server.base / "output" / "diffprivacy" / text.split(":")[0]
    assert key_e_file.is_file()
    (curve,) = comfy_server.output_images(entry, only(api, "PreviewImage"))  # the loss curve
    assert min(Image.open(io.BytesIO(curve)).size) > 32

    key = comfy_server.base / "output" / saved_key(entry, api)
    assert key.is_file() and key != key_e_file

    (comfy_server.base / "input" / "protected.png").write_bytes(protected[0])  # recover pastes the faces into it
    rec_api = workflow_api("recover")
    nodes_of(rec_api, "DiffPrivacyLoadKey")[0]["inputs"]["key_path"] = saved_key(entry, api)
    rec = comfy_server.run(rec_api, timeout=120)
    (png,) = comfy_server.output_images(rec, only(rec_api, "DiffPrivacySaveImageClean"))
    assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)
