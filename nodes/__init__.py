"""ComfyUI adapters. Each module here exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.

Modules are listed explicitly (no discovery by file name). A module may declare
``REQUIRES = {"NodeId": ("python_module", ...)}``: a node whose optional dependency is not
installed is left out with a logged reason, and the rest of the pack still loads. A module
that fails to import disables only its own nodes.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

log = logging.getLogger("diffprivacy")

NODE_MODULES = (
    "encrypt_nodes",
    "recover_nodes",
    "schedule_nodes",
    "key_nodes",
    "key_e_nodes",
    "face_nodes",
    "eval_nodes",
    "baseline_nodes",
    "deid_nodes",
    "identity_nodes",
    "fsap_nodes",
    "dp_nodes",
    "detector_nodes",
    "difp_nodes",
    "pipeline_nodes",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
DISABLED: dict = {}  # node id or module -> reason, for logs and tests


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _load():
    from .common import guard_float_inputs
    for name in NODE_MODULES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except Exception as e:  # a broken module must not take the pack down
            DISABLED[name] = f"{type(e).__name__}: {e}"
            log.error("[Diff-Privacy] nodes in %s disabled: %s", name, DISABLED[name])
            continue
        requires = getattr(mod, "REQUIRES", {})
        for node_id, cls in mod.NODE_CLASS_MAPPINGS.items():
            missing = _missing(requires.get(node_id, ()))
            if missing:
                DISABLED[node_id] = ("needs the Python package(s) " + ", ".join(missing) +
                                     ": pip install -r requirements.txt in ComfyUI's environment")
                log.warning("[Diff-Privacy] %s disabled: %s", node_id, DISABLED[node_id])
                continue
            guard_float_inputs(cls)  # NaN / infinity in a number input: a clear error, never a silent black image
            NODE_CLASS_MAPPINGS[node_id] = cls
            if node_id in mod.NODE_DISPLAY_NAME_MAPPINGS:
                NODE_DISPLAY_NAME_MAPPINGS[node_id] = mod.NODE_DISPLAY_NAME_MAPPINGS[node_id]


_load()
