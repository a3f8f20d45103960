#!/usr/bin/env python3
"""Thumbnails of the shipped workflows (example_workflows/<name>.jpg, which ComfyUI's template browser shows)
and the README's screenshot of the main workflow (docs/images/), taken from ComfyUI's real front end.

    bash scripts/dev.sh python scripts/make_thumbnails.py [--photo PHOTO] [--only NAME ...]

Starts a throw-away ComfyUI with this pack (no models needed: the screenshot shows the workflow as a fresh
install opens it, its photo inputs filled with --photo so Load Image shows a face) and drives its front end in
headless Chromium (tests/frontend.py, the harness of the front-end tests): each workflow is loaded as a
drag-and-drop does, the view is fitted to the graph with menus hidden, and the page is captured. JPEGs are
written with Pillow and kept under 150 KB.

A thumbnail is a card: the workflow's name and what it does in one line (``CARDS``), in type that reads at the
template browser's card size, above the graph. The front end the host ships (comfyui-frontend-package 1.32.9)
describes a pack's template only by its file name (web/js/template_order.js sets their order): the card is the
one place a one-line description shows.
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
# What each workflow does, in one line: the template browser's card. The recommended first one says so.
CARDS = {
    "anonymize-text-key": "START HERE: four new identities for the face in your photo; key to undo it",
    "anonymize-fast": "anonymize-text-key with the fast gradient (tiny decoder on the face)",
    "anonymize": "new identities with a learnt Key-E file (run learn-key-e first)",
    "anonymize-learn-key-e": "the full method: learn Key-E, anonymize, seal the key",
    "hide": "people no longer recognise the face; recognizers still do",
    "hide-learn-key-e": "learn Key-E, then hide the identity from people; seal the key",
    "learn-key-e": "learn the photo's Key-E (step 1 of anonymize / hide)",
    "recover": "key file + password: the original photo back",
    "key-security": "paper Fig. 7: what a wrong Key-I or Key-E recovers",
    "embedding-schedule": "img2img under the embedding schedule, stock KSampler",
    "evaluate-baselines": "blur, pixelation, mosaic: scored for protection and quality",
    "identity-from-donor": "another person's identity (FaceID) onto your photo",
    "dp-identity": "a differentially private identity (epsilon reported) rendered",
    "fsap": "adversarial identity change against a face recognizer (FSAP)",
    "hide-from-detectors": "face detectors miss the face; the photo looks unchanged",
    "difp-protect": "DIFP: a donor identity and your photo's style; sealed key",
    "difp-recover": "DIFP key file + password: the original back",
}
CARD_W, BAND_H = 640, 106
PHOTO_NAMES = ("face.png", "other-face.png", "donor.png")  # the photo names the workflows' Notes mention


def card(name: str, shot):
    """The thumbnail: a band with the name and ``CARDS[name]`` (large type), the screenshot below it."""
    from PIL import Image, ImageDraw, ImageFont
    if name not in CARDS:
        raise SystemExit(f"{name}: no one-line description in make_thumbnails.CARDS; add one")
    shot = shot.convert("RGB").resize((CARD_W, round(shot.height * CARD_W / shot.width)), Image.LANCZOS)
    sheet = Image.new("RGB", (CARD_W, BAND_H + shot.height), "#1f2430")
    sheet.paste(shot, (0, BAND_H))
    draw = ImageDraw.Draw(sheet)
    title, text = ImageFont.load_default(32), ImageFont.load_default(22)
    draw.text((16, 10), name, font=title, fill="#ffffff")
    words, lines = CARDS[name].split(), [""]
    for word in words:  # at most two lines of the description
        trial = f"{lines[-1]} {word}".strip()
        if draw.textlength(trial, font=text) > CARD_W - 32 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = trial
    for i, line in enumerate(lines[:2]):
        draw.text((16, 52 + i * 24), line, font=text, fill="#ffd27f" if name == "anonymize-text-key" else "#d0d6e0")
    return sheet


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
                for _ in range(3):  # the page's first drawing can come back blank: take it again
                    shot = Image.open(io.BytesIO(fe.screenshot(ui, 1600, 1200)))
                    if max(shot.convert("L").getextrema()) - min(shot.convert("L").getextrema()) > 40:
                        break
                else:
                    raise SystemExit(f"{path.stem}: the front end drew nothing three times")
                save_jpeg(card(path.stem, shot), path.with_suffix(".jpg"), CARD_W)
                if path.stem == MAIN_WORKFLOW:
                    shot = Image.open(io.BytesIO(fe.screenshot(ui, 2800, 1150, margin=20)))
                    save_jpeg(shot, REPO / "docs" / "images" / f"workflow-{path.stem}.jpg", 1800)
        finally:
            fe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
