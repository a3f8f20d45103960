"""Pictures: every shipped workflow has its thumbnail (example_workflows/<name>.jpg, made by
scripts/make_thumbnails.py from the real front end), served where ComfyUI's template browser looks for it; every
picture is a real JPEG under 150 KB, and each README picture is made by a script in scripts/."""
import urllib.request

from PIL import Image

from conftest import REPO

MAX_BYTES = 150_000
WORKFLOWS = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
README_IMAGES = {"hiding.jpg": "make_readme_figures.py", "baselines.jpg": "make_readme_figures.py",
                 "evaluation-blur.jpg": "make_readme_figures.py",
                 "workflow-anonymize-learn-key-e.jpg": "make_thumbnails.py"}


def _small_jpeg(path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert path.stat().st_size < MAX_BYTES, f"{path.relative_to(REPO)} is {path.stat().st_size // 1024} KB"
    with Image.open(path) as im:
        assert im.format == "JPEG", path


def test_every_workflow_has_a_small_thumbnail_and_every_readme_picture_a_script():
    missing = [n for n in WORKFLOWS if not (REPO / "example_workflows" / f"{n}.jpg").is_file()]
    assert not missing, f"no thumbnail for {missing}: bash scripts/dev.sh python scripts/make_thumbnails.py"
    for name in WORKFLOWS:
        _small_jpeg(REPO / "example_workflows" / f"{name}.jpg")
    for image, script in README_IMAGES.items():
        _small_jpeg(REPO / "docs" / "images" / image)
        text = (REPO / "scripts" / script).read_text()
        assert image in text or (image.startswith("workflow-") and '"workflow-' in text), (image, script)


def test_the_template_browser_gets_the_thumbnails(comfy_server):
    pack = comfy_server.url + "/api/workflow_templates/diff-privacy-nodes"
    for name in WORKFLOWS:  # the front end asks for /api/workflow_templates/<pack folder>/<name>.jpg
        with urllib.request.urlopen(f"{pack}/{name}.jpg", timeout=10) as r:
            assert r.read() == (REPO / "example_workflows" / f"{name}.jpg").read_bytes(), name
