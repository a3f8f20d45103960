"""The Key-E nodes: in-process (as ComfyUI calls them, under inference mode) and in the live server."""
import importlib
from pathlib import Path

import pytest
import torch

import folder_paths
from key_e_tiny import load_tiny_models


@pytest.fixture(scope="module")
def nodes():
    return importlib.import_module("diffprivacy.nodes.key_e_nodes")


@pytest.fixture(scope="module")
def models(tiny_checkpoint_path, tiny_clip_vision_path):
    return load_tiny_models(tiny_checkpoint_path, tiny_clip_vision_path)


@pytest.fixture()
def output_dir(tmp_path):
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(old)


def learn(nodes, models, **kw):
    m, c, v, cv = models
    args = dict(steps=3, learning_rate=1e-3, weight_decay=0.01, seed=23, variant="multi-scale MSI (paper)",
                timesteps_per_step=2, lr_schedule="cosine", warmup_steps=1, precision="fp32 (reference)",
                random_flip=True, resolution=64, layers="3, 7, 11, 15, 24", filename_prefix="diffprivacy/key_e",
                password="", checkpoint_every=0)
    args.update(kw)
    image = torch.rand(1, 70, 90, 3, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return nodes.DiffPrivacyLearnKeyE().learn(m, c, v, cv, image, **args)


def test_nodes_are_registered_with_a_tooltip_on_every_input(nodes):
    pack = importlib.import_module("diffprivacy.nodes")
    assert "key_e_nodes" not in pack.DISABLED
    for node_id in ("DiffPrivacyLearnKeyE", "DiffPrivacyLoadKeyE"):
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_learn_writes_a_key_e_file_that_the_loader_reads_back(nodes, models, output_dir):
    out = learn(nodes, models)
    key_e, uncond, curve, path = out["result"]
    assert key_e[0][0].shape == (10, 77, 64) and key_e[0][1]["pooled_output"].shape == (10, 64)
    assert uncond[0][0].shape == (1, 77, 64)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min() and curve.max() <= 1
    path = Path(path)
    assert path.parent == output_dir / "diffprivacy" and path.is_file()
    m, c = models[0], models[1]
    with torch.inference_mode():
        loaded, loaded_curve, steps = nodes.DiffPrivacyLoadKeyE().load("", "", key_path=str(path), model=m, clip=c)
    assert steps == 3 and loaded_curve.shape == curve.shape
    torch.testing.assert_close(loaded[0][0], key_e[0][0])

    # resume from the file: it is updated in place and continues the step count and loss curve
    out2 = learn(nodes, models, steps=5, resume_path=str(path))
    assert Path(out2["result"][3]) == path
    with torch.inference_mode():
        _, _, steps = nodes.DiffPrivacyLoadKeyE().load("", "", key_path=str(path))
    assert steps == 5


def test_sealed_key_e_needs_its_password(nodes, models, output_dir):
    out = learn(nodes, models, steps=1, password="correct horse")
    path = out["result"][3]
    assert b"key_e" not in Path(path).read_bytes()[:4096]  # nothing about the contents in the public header
    loader = nodes.DiffPrivacyLoadKeyE()
    with pytest.raises(ValueError, match="sealed"):
        loader.load("", "", key_path=path)
    with pytest.raises(ValueError):
        loader.load("", "wrong", key_path=path)
    key_e, _, steps = loader.load("", "correct horse", key_path=path)
    assert steps == 1 and key_e[0][0].shape == (10, 77, 64)


def test_bad_settings_are_refused_clearly(nodes, models, output_dir):
    with pytest.raises(ValueError, match="layers"):
        learn(nodes, models, layers="3, seven")
    with pytest.raises(ValueError, match="only 24 layers"):
        learn(nodes, models, layers="3, 30")
    with pytest.raises(ValueError, match="resolution"):
        learn(nodes, models, resolution=60)


def test_learn_key_e_workflow_runs_in_the_live_server(comfy_server):
    from workflow_builder import ui_to_api
    from workflows_key_e import workflows

    graph = workflows()[0]
    assert graph.name == "learn-key-e"
    api = ui_to_api(graph.to_ui(comfy_server.object_info), comfy_server.object_info)
    learn_node = next(n for n in api.values() if n["class_type"] == "DiffPrivacyLearnKeyE")
    assert learn_node["inputs"]["steps"] == 6100 and learn_node["inputs"]["learning_rate"] == 1e-4
    learn_node["inputs"].update(steps=4, resolution=64)  # the shipped defaults would take hours on a CPU
    before = set((comfy_server.base / "output").rglob("key_e_*.safetensors"))
    entry = comfy_server.run(api, timeout=300)
    written = set((comfy_server.base / "output").rglob("key_e_*.safetensors")) - before
    assert len(written) == 1
    assert len(comfy_server.output_images(entry)) == 1  # the loss-curve preview
