#!/usr/bin/env python3
"""Thumbnails of the shipped workflows (example_workflows/<name>.jpg, which ComfyUI's template browser shows)
and the README's screenshot of the main workflow (docs/images/), taken from ComfyUI's real front end.

    bash scripts/dev.sh python scripts/make_thumbnails.py [--photo PHOTO] [--only NAME ...]

Starts a throw-away ComfyUI with this pack (no models needed: the screenshot shows the workflow as a fresh
install opens it, its photo inputs filled with --photo so Load Image shows a face) and drives its front end in
headless Chromium (tests/frontend.py, the harness of the front-end tests): each workflow is loaded as a
drag-and-drop does, the view is fitted to the graph with menus hidden, and the page is captured. JPEGs are
written with Pillow and kept under 150 KB.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from comfy_server import REPO, ComfyServer  # scripts/, beside this file
from frontend import FrontEnd, find_chromium  # tests/: the front-end harness
from make_readme_figures import save_jpeg  # scripts/, beside this file

MAIN_WORKFLOW = "anonymize-learn-key-e"
PHOTO_NAMES = ("face.png", "other-face.png", "donor.png")  # the photo names the workflows' Notes mention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=REPO.parent / "shared" / "data" / "photos" / "one-face-astronaut.png",
                    help="shown in the workflows' Load Image nodes (optional)")
    ap.add_argument("--only", nargs="*", help="workflow names (default: all)")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        ap.error("Chromium is not installed (apt-get install chromium)")
    from PIL import Image

    workflows = sorted((REPO / "example_workflows").glob("*.json"))
    if args.only:
        workflows = [w for w in workflows if w.stem in args.only]
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        if args.photo.is_file():
            for name in PHOTO_NAMES:
                Image.open(args.photo).convert("RGB").save(Path(tmp) / "input" / name)
        fe = FrontEnd(server.url, chromium)
        try:
            fe.wait_for_app()
            for path in workflows:
                ui = json.loads(path.read_text())
                shot = Image.open(io.BytesIO(fe.screenshot(ui, 1600, 1200)))
                save_jpeg(shot, path.with_suffix(".jpg"), 640)
                if path.stem == MAIN_WORKFLOW:
                    shot = Image.open(io.BytesIO(fe.screenshot(ui, 2800, 1150, margin=20)))
                    save_jpeg(shot, REPO / "docs" / "images" / f"workflow-{path.stem}.jpg", 1800)
        finally:
            fe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
