"""Write every shipped workflow into example_workflows/ (UI format, what users drag into ComfyUI).

    bash scripts/dev.sh python scripts/make_workflows.py

Starts a throw-away ComfyUI with this pack (no models needed), reads /object_info, and builds
each workflow defined in the modules below with workflow_builder.Graph.
"""
from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

from comfy_server import REPO, ComfyServer  # scripts/, beside this file

# Modules defining `workflows() -> list[Graph]`, listed explicitly.
DEFINITIONS = ["workflows_schedule", "workflows_encrypt", "workflows_key_e", "workflows_eval",
               "workflows_identity", "workflows_dp", "workflows_difp", "workflows_detectors",
               "workflows_fsap"]


def main() -> int:
    graphs = []
    for name in DEFINITIONS:
        graphs += importlib.import_module(name).workflows()
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = server.object_info
        out = REPO / "example_workflows"
        out.mkdir(exist_ok=True)
        for g in graphs:
            path = out / f"{g.name}.json"
            path.write_text(json.dumps(g.to_ui(info), indent=1) + "\n")
            print("wrote", path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
