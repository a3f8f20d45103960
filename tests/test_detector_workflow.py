"""The shipped hide-from-detectors workflow, end to end in a live ComfyUI (real MTCNN and MediaPipe BlazeFace weights,
a real face),
plus bad input posted to the live server: the server keeps serving."""
import json

import numpy as np
from PIL import Image

from conftest import nodes_of


def _only(api, class_type):
    (nid,) = [k for k, n in api.items() if n["class_type"] == class_type]
    return nid


def test_hide_from_detectors_workflow_saves_a_clean_png_within_the_range(comfy_server, workflow_api):
    api = workflow_api("hide-from-detectors")
    inputs = nodes_of(api, "DiffPrivacyHideFromDetectors")[0]["inputs"]
    inputs["iterations"] = 6   # a few steps: CPU time
    bound = min(inputs["range_rp"], 6 * inputs["epsilon"])   # the range, and how far 6 steps can go
    entry = comfy_server.run(api, timeout=300)
    (text,) = entry["outputs"][_only(api, "PreviewAny")]["text"]
    (rep,) = json.loads(text)
    assert rep["faces"] >= 1 and rep["private"] == list(range(rep["faces"])) and rep["iterations"] >= 1
    assert 0 < rep["max_change"] <= bound and {"mtcnn", "blazeface-full"} <= set(rep["private_hidden"])
    saved = entry["outputs"][_only(api, "DiffPrivacySaveImageClean")]["images"]
    (png,) = [comfy_server.base / "output" / s["subfolder"] / s["filename"] for s in saved]
    with Image.open(png) as im:
        assert im.format == "PNG" and not im.info.get("prompt") and not im.info.get("workflow")
        out = np.asarray(im.convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(comfy_server.base / "input" / "face.png").convert("RGB"), dtype=np.int16)
    assert 0 < np.abs(out - original).max() <= bound


def test_bad_input_to_the_live_node_fails_cleanly_and_the_server_keeps_serving(comfy_server, workflow_api):
    api = workflow_api("hide-from-detectors")
    node = nodes_of(api, "DiffPrivacyHideFromDetectors")[0]["inputs"]
    node["private_faces"], node["face_indices"] = "indices", "7"
    entry = comfy_server.run(api, timeout=300, expect_error=True)
    assert "out of range" in json.dumps(entry)
    assert comfy_server.alive() and comfy_server.get_json("/object_info/DiffPrivacyHideFromDetectors")
