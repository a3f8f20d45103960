"""The live ComfyUI server of the tests: scripts/comfy_server.py's throw-away server, plus the
test-only node pack that registers the tiny models (tests/comfy_test_pack) and the placing of
fixture files (models, inputs) into its base directory. Used by the ``comfy_server`` fixture.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from comfy_server import REPO, ComfyServer


class ComfyTestServer(ComfyServer):
    """A ComfyServer that also serves tests/comfy_test_pack, with helpers to place fixture files."""

    def __init__(self, base_dir: Path, **kwargs):
        super().__init__(base_dir, custom_nodes={"comfy_test_pack": REPO / "tests" / "comfy_test_pack"}, **kwargs)

    def put_model(self, folder: str, name: str, source: Path):
        dest = self.base / "models" / folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.symlink_to(Path(source).resolve())
        return dest

    def put_input(self, name: str, source: Path):
        dest = self.base / "input" / name
        shutil.copyfile(source, dest)
        return dest
