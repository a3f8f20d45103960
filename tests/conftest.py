"""Shared test set-up.

The host is the real ComfyUI 0.3.75 that scripts/setup_env.sh unpacks (its path in DP_COMFY).
Unit tests import its ``comfy`` package in-process; the pack itself is importable as the
package ``diffprivacy`` (whatever this clone's folder is called), exactly as ComfyUI imports
it from ``custom_nodes/``: by file location, with relative imports inside.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

_comfy = os.environ.get("DP_COMFY")
if not _comfy or not (Path(_comfy) / "comfy").is_dir():
    raise pytest.UsageError(
        "DP_COMFY does not point at the ComfyUI host. Run the tests with `bash scripts/test.sh`, "
        "which installs the host and sets it.")
if _comfy not in sys.path:
    sys.path.insert(0, _comfy)  # tests only: the product never edits sys.path

import comfy.cli_args  # noqa: E402  (parses no argv when imported as a library)
import torch  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True

# The pack as a package, without running its __init__ (tests of __init__ load it explicitly).
if "diffprivacy" not in sys.modules:
    _pkg = types.ModuleType("diffprivacy")
    _pkg.__path__ = [str(REPO)]
    _pkg.__file__ = str(REPO / "__init__.py")
    sys.modules["diffprivacy"] = _pkg


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips when absent outside CI, fails when absent in CI."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{p} is missing: CI must have ../shared beside the clone")
        pytest.skip(f"{p} is not present (shared test material lives beside the clone)")
    return p


def require_package(module: str, install: str):
    """Import a package the test command installs; skips when absent outside CI, fails when absent in CI
    (``pytest.importorskip`` would skip in CI too, hiding a broken environment)."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is missing ({e}): scripts/test.sh installs it ({install})")
        pytest.skip(f"{module} is not installed: {install}", allow_module_level=True)


@pytest.fixture(scope="session")
def shared():
    return shared_path


# -- tiny models, in-process -------------------------------------------------------------------
sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts")]  # tests only: fixture modules, harness; scripts/


@pytest.fixture(scope="session")
def tiny_checkpoint_path():
    import comfy_test_pack  # noqa: F401  (registers the tiny model type)
    import tiny_models
    return tiny_models.tiny_checkpoint_path()


@pytest.fixture(scope="session")
def tiny_clip_vision_path():
    import comfy_test_pack  # noqa: F401
    import tiny_models
    return tiny_models.tiny_clip_vision_path()


@pytest.fixture(scope="session")
def tiny_sd(tiny_checkpoint_path):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded by ComfyUI as CheckpointLoaderSimple does."""
    import comfy.sd
    with torch.inference_mode():  # as ComfyUI runs a node: the weights become inference tensors
        out = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


@pytest.fixture(scope="session")
def tiny_clip_vision(tiny_clip_vision_path):
    import comfy.clip_vision
    with torch.inference_mode():
        return comfy.clip_vision.load(str(tiny_clip_vision_path))


# -- the live server -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_checkpoint_path, tiny_clip_vision_path):
    """A real ComfyUI 0.3.75 with this pack, the tiny models under the names the shipped
    workflows use, and a real face photo as input/face.png. Stopped at the end of the session."""
    from harness import ComfyTestServer
    server = ComfyTestServer(tmp_path_factory.mktemp("comfy"))
    server.put_model("checkpoints", "v1-5-pruned-emaonly.safetensors", tiny_checkpoint_path)
    server.put_model("clip_vision", "clip-vit-large-patch14.safetensors", tiny_clip_vision_path)
    face = SHARED / "data" / "photos" / "obama.jpg"
    if face.exists():
        from face_fixtures import small_face_image
        small_face_image(face).save(server.base / "input" / "face.png")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def workflow_api(comfy_server):
    """API-format prompt of a shipped workflow (example_workflows/<name>.json), converted as the front end does."""
    import json as _json
    from workflow_builder import ui_to_api  # scripts/

    def load(name: str) -> dict:
        ui = _json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        return ui_to_api(ui, comfy_server.object_info)
    return load


def nodes_of(api: dict, class_type: str) -> list[dict]:
    return [n for n in api.values() if n["class_type"] == class_type]


@pytest.fixture(scope="session")
def full_sd15_path():
    """The full-size SD 1.5-layout random checkpoint (~2 GB), built once and cached outside the clone."""
    import tiny_models
    return tiny_models.full_sd15_checkpoint_path()


@pytest.fixture
def vae_approx(tmp_path, monkeypatch):
    """An empty ComfyUI ``vae_approx`` folder (where the tiny decoders live), the only one ComfyUI searches."""
    import folder_paths
    folder = tmp_path / "vae_approx"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx", ([str(folder)], {".safetensors", ".pth"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder
