"""The pack inside a real ComfyUI 0.3.75 server: loading, the schedule workflow, errors that leave the server
serving."""
import io
import json
import re

from PIL import Image

from conftest import REPO, nodes_of


def test_pack_loads_without_import_errors_and_registers_its_nodes(comfy_server):
    log = comfy_server.log_tail(200_000)
    assert re.search(r"IMPORT FAILED.*diff-privacy-nodes", log) is None, log
    assert "[Diff-Privacy]" not in log or "disabled" not in log, log
    ours = {k for k in comfy_server.object_info if k.startswith("DiffPrivacy")}
    from diffprivacy.nodes import NODE_CLASS_MAPPINGS
    assert ours == set(NODE_CLASS_MAPPINGS) and "DiffPrivacyEmbeddingSchedule" in ours
    info = comfy_server.object_info["DiffPrivacyEmbeddingSchedule"]
    for section in info["input"].values():
        for name, spec in section.items():
            assert spec[1].get("tooltip"), f"input {name} has no tooltip"


def test_every_shipped_workflow_is_valid_json_for_the_front_end(comfy_server, workflow_api):
    files = sorted((REPO / "example_workflows").glob("*.json"))
    assert files, "no workflows shipped"
    for f in files:
        ui = json.loads(f.read_text())
        assert {"nodes", "links", "version"} <= set(ui), f
        api = workflow_api(f.stem)  # every node type is installed and every widget maps
        assert api


def test_template_browser_lists_each_workflow_once(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    ours = templates.get("diff-privacy-nodes", [])
    shipped = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert sorted(ours) == shipped


def test_embedding_schedule_workflow_runs_and_saves_an_image(comfy_server, workflow_api):
    api = workflow_api("embedding-schedule")
    entry = comfy_server.run(api, timeout=600)
    images = comfy_server.output_images(entry)
    assert len(images) == 1
    img = Image.open(io.BytesIO(images[0]))
    src = Image.open(comfy_server.base / "input" / "face.png")
    assert img.size == (src.width // 8 * 8, src.height // 8 * 8)


def test_wrong_input_type_is_refused_by_validation(comfy_server, workflow_api):
    api = workflow_api("embedding-schedule")
    ckpt_id = next(k for k, n in api.items() if n["class_type"] == "CheckpointLoaderSimple")
    nodes_of(api, "DiffPrivacyEmbeddingSchedule")[0]["inputs"]["clip"] = [ckpt_id, 0]  # MODEL into CLIP
    status, body = comfy_server.post_prompt(api)
    assert status == 400
    assert "node_errors" in body and body["node_errors"], body


def test_corrupted_checkpoint_gives_an_error_and_the_server_keeps_serving(comfy_server, workflow_api):
    broken = comfy_server.base / "models" / "checkpoints" / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(range(256)) * 8)
    api = workflow_api("embedding-schedule")
    nodes_of(api, "CheckpointLoaderSimple")[0]["inputs"]["ckpt_name"] = "broken.safetensors"
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert error["node_type"] == "CheckpointLoaderSimple"
    assert comfy_server.alive()
    again = comfy_server.run(workflow_api("embedding-schedule"), timeout=600)
    assert comfy_server.output_images(again)


def test_bad_stage_text_is_reported_in_history(comfy_server, workflow_api):
    api = workflow_api("embedding-schedule")
    nodes_of(api, "DiffPrivacyEmbeddingSchedule")[0]["inputs"]["stage_text"] = "one\ntwo\nthree"
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert error["node_type"] == "DiffPrivacyEmbeddingSchedule"
    assert "ten lines" in error["exception_message"] or "10 lines" in error["exception_message"]


def test_full_size_sd15_checkpoint_loads_with_the_stock_loader_and_runs_the_schedule(comfy_server, full_sd15_path):
    """A random checkpoint with SD 1.5's real layout: proves a user's real checkpoint loads and drives our node."""
    comfy_server.put_model("checkpoints", "sd15-layout-random.safetensors", full_sd15_path)
    from workflow_builder import Graph
    g = Graph("full-size")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="sd15-layout-random.safetensors")
    sched = g.node("DiffPrivacyEmbeddingSchedule", clip=ckpt.out(1), tau=0.4, stage_text="a photo of a person")
    empty = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.node("KSampler", model=ckpt.out(0), positive=sched.out(0), negative=sched.out(1),
                     latent_image=empty.out(0), seed=1, steps=2, cfg=1.0, sampler_name="ddim",
                     scheduler="ddim_uniform", denoise=1.0)
    decoded = g.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    g.node("PreviewImage", images=decoded.out(0))
    from workflow_builder import ui_to_api
    api = ui_to_api(g.to_ui(comfy_server.object_info), comfy_server.object_info)
    entry = comfy_server.run(api, timeout=900)
    assert comfy_server.output_images(entry)
    log = comfy_server.log_tail(400_000)
    assert "model_type EPS" in log or "BaseModel" in log or "SD15" in log
