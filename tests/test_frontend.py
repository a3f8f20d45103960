"""The shipped workflows in ComfyUI's real front end: each loads as a user's drag-and-drop does,
and "Queue" would post exactly the prompt the other live tests post (tests convert UI to API
format with scripts/workflow_builder.ui_to_api; this proves that conversion is the front end's)."""
import json
import os

import pytest

from conftest import REPO
from frontend import FrontEnd, find_chromium


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


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "example_workflows").glob("*.json")))
def test_front_end_loads_the_workflow_and_queues_what_the_tests_post(front_end, comfy_server, name):
    from workflow_builder import ui_to_api
    ui = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    posted_by_front_end = front_end.prompt_of(ui)
    assert posted_by_front_end, "the front end produced an empty prompt"
    assert _core(posted_by_front_end) == _core(ui_to_api(ui, comfy_server.object_info))
    ours = {n["class_type"] for n in posted_by_front_end.values() if n["class_type"].startswith("DiffPrivacy")}
    assert ours, "no Diff-Privacy node survived loading"
