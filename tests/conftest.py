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


@pytest.fixture(scope="session")
def shared():
    return shared_path
