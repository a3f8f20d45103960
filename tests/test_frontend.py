"""The shipped workflows in ComfyUI's real front end (headless Chromium). Each is loaded once, as a user's
drag-and-drop does, and checked for everything a user would meet:

- "Queue" would post exactly the prompt the other live tests post (tests convert UI to API format with
  scripts/workflow_builder.ui_to_api; this proves that conversion is the front end's);
- the drawing: no node on another node or on a group's title, no group on another, every node in a
  group, a Note, and every node at the size the generator gave it (the front end did not have to grow
  one: the generator's layout is what the user sees);
- no widget names a file a fresh install lacks, except the models the README tells the user to place
  and the photos the workflow's own Note says where to put;
- it opens readable: on a 1600 x 1000 window, at a zoom the front end draws widgets at, with the Read me
  and the first group on screen;
- what the pack's nodes report after a run (Face Model Loader's choice, Save Key's file and sealed state) is
  drawn on the nodes by the pack's extension (web/js/node_text.js);
- the template browser gets the pack's templates with the recommended first one on top (web/js/template_order.js).
"""
import json
import os

import pytest

from conftest import REPO
from frontend import FrontEnd, find_chromium, layout_problems, named_files

WORKFLOWS = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
# Models the README's model table tells the user to place (name -> folder under models/).
README_MODELS = {"v1-5-pruned-emaonly.safetensors": "checkpoints", "clip-vit-large-patch14.safetensors": "clip_vision",
                 "antelopev2": "insightface/models", "buffalo_l": "insightface/models",
                 "ip-adapter-faceid_sd15.bin": "ipadapter", "ip-adapter_sd15.safetensors": "ipadapter",
                 "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "clip_vision"}
PHOTO = (".png", ".jpg", ".jpeg", ".webp")


@pytest.fixture(scope="module")
def front_end(comfy_server):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed (scripts/test.sh installs it where it can)")
    fe = FrontEnd(comfy_server.url, chromium)
    try:
        fe.wait_for_app()
        yield fe
    finally:
        fe.close()


def _core(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def _note(ui: dict) -> str:
    return "\n".join(str(v) for n in ui["nodes"] if n["type"] == "Note" for v in n["widgets_values"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_in_the_front_end_queues_what_the_tests_post_and_reads_cleanly(front_end, comfy_server, name):
    from workflow_builder import ui_to_api
    ui = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    seen = front_end.inspect(ui)

    posted_by_front_end = seen["prompt"]
    assert posted_by_front_end, "the front end produced an empty prompt"
    assert _core(posted_by_front_end) == _core(ui_to_api(ui, comfy_server.object_info))
    assert any(n["class_type"].startswith("DiffPrivacy") for n in posted_by_front_end.values()), \
        "no Diff-Privacy node survived loading"

    assert layout_problems(seen) == []
    assert seen["groups"], "no groups: a workflow says its stages (Graph.stage in its definition)"
    assert _note(ui).count("\n") >= 2, "no three-line Note (Graph(..., note=...) in its definition)"
    stored = {n["id"]: n["size"] for n in ui["nodes"]}
    grown = {n["id"]: (stored[n["id"]], [round(v) for v in n["size"]]) for n in seen["nodes"]
             if any(round(v) > s for v, s in zip(n["size"], stored[n["id"]]))}
    assert not grown, f"the front end grew nodes past the generator's sizes (id: (generated, shown)): {grown}"

    note = _note(ui)
    not_fresh = [(nid, widget, value) for nid, widget, value, _ in named_files(seen)
                 if value not in README_MODELS and not (value.lower().endswith(PHOTO) and value in note)]
    assert not not_fresh, ("widget values naming files a fresh install does not have (neither a model the README "
                           f"places nor a photo the Note places): {not_fresh}")


def _on_screen(box, window) -> bool:
    x, y, w, h = box
    return x >= 0 and y >= 0 and x + w <= window[0] and y + h <= window[1]


def test_every_workflow_opens_at_a_readable_zoom_with_its_read_me_and_first_group_on_screen(front_end):
    workflows = {name: json.loads((REPO / "example_workflows" / f"{name}.json").read_text()) for name in WORKFLOWS}
    seen = front_end.opening_views(workflows, 1600, 1000)
    problems = []
    for name, view in seen.items():
        if view["scale"] < 0.75 or view["low_quality"]:
            problems.append(f"{name}: opens at zoom {view['scale']:.2f} (low quality: {view['low_quality']})")
        if view["note"] is None or not _on_screen(view["note"], view["window"]):
            problems.append(f"{name}: the Read me is not wholly on screen: {view['note']} in {view['window']}")
        elif view["note_covered"]:
            problems.append(f"{name}: the front end's bars cover the Read me's title at {view['note_covered']}")
        title = view["groups"][0]["box"][:3] + [34 * view["scale"]]  # the first group's title bar
        if not _on_screen(title, view["window"]):
            problems.append(f"{name}: the first group's title is off screen: {view['groups'][0]}")
    assert not problems, "\n".join(problems)


def test_face_model_loader_and_save_key_draw_their_text_on_the_node_after_a_run(front_end, comfy_server):
    from workflow_builder import ui_to_api
    from workflow_helpers import only, shown_key_name, shrink
    ui = json.loads((REPO / "example_workflows" / "anonymize-text-key.json").read_text())
    front_end.evaluate(f"app.loadGraphData({json.dumps(ui)})")
    api = shrink(ui_to_api(ui, comfy_server.object_info), 64, 2)
    api[only(api, "DiffPrivacySaveKey")]["inputs"]["password"] = "front end"
    own_id, comfy_server.client_id = comfy_server.client_id, front_end.client_id()  # the page hears the run
    try:
        entry = comfy_server.run(api, timeout=300)
    finally:
        comfy_server.client_id = own_id
    loader, saver = only(api, "DiffPrivacyFaceModelLoader"), only(api, "DiffPrivacySaveKey")
    seen = front_end.drawn_node_text([int(loader), int(saver)])
    for nid in (loader, saver):
        (reported,) = entry["outputs"][nid]["text"]
        held, drawn = seen[nid]["held"], " ".join(seen[nid]["drawn"])
        assert held == reported, f"node {nid}: the page holds {held!r}, the run reported {reported!r}"
        assert " ".join(reported.split()) in " ".join(drawn.split()), f"node {nid}: {reported!r} not drawn: {drawn!r}"
    assert seen[saver]["held"] == f"{shown_key_name(entry, api)} (sealed with the password)"


def test_the_template_browser_lists_the_recommended_workflow_first_then_the_rest_in_order(front_end):
    lists = front_end.evaluate("window.comfyAPI.api.api.getWorkflowTemplates()")  # what the browser is given
    (ours,) = [names for names in lists.values() if "anonymize-text-key" in names]
    first = ["anonymize-text-key", "anonymize-fast", "anonymize-learn-key-e", "recover"]
    assert ours == first + sorted(set(WORKFLOWS) - set(first)), ours


def test_layout_check_fails_on_overlapping_nodes_and_covered_group_titles(front_end):
    ui = json.loads((REPO / "example_workflows" / "recover.json").read_text())
    first, second = [n for n in ui["nodes"] if n["type"] != "Note"][:2]
    second["pos"] = [first["pos"][0] + 20, first["pos"][1] + 20]  # two nodes on top of each other
    problems = layout_problems(front_end.inspect(ui))
    assert any(f"node {first['id']} " in p and f"node {second['id']} " in p and "overlaps" in p for p in problems), \
        problems

    ui = json.loads((REPO / "example_workflows" / "recover.json").read_text())
    group = ui["groups"][1]
    node = next(n for n in ui["nodes"] if n["type"] != "Note")
    node["pos"] = [group["bounding"][0] + 10, group["bounding"][1] + 10]  # on the second group's title bar
    problems = layout_problems(front_end.inspect(ui))
    assert any("covers the title" in p and group["title"] in p for p in problems), problems


def test_file_check_finds_a_key_file_a_fresh_install_lacks(front_end):
    ui = json.loads((REPO / "example_workflows" / "recover.json").read_text())
    load = next(n for n in ui["nodes"] if n["type"] == "DiffPrivacyLoadKey")
    load["widgets_values"][0] = "key_00001_.safetensors"  # what this workflow used to ship
    assert (load["id"], "key_file", "key_00001_.safetensors") in [f[:3] for f in named_files(front_end.inspect(ui))]
