"""Diff-Privacy nodes: diffusion-based face privacy for ComfyUI.

ComfyUI imports this file from custom_nodes/. Everything below is relative imports; no
model is loaded and nothing is downloaded at import time.
"""
WEB_DIRECTORY = "./web"  # served at /extensions/<folder>/: web/docs/<NodeId>.md is each node's help page

if __package__:  # imported as a package (ComfyUI); pytest may import this file alone when it walks a clone's parents
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
