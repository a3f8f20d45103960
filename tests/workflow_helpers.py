"""Helpers for the live-workflow tests (a fixture module: no tests here): find nodes in an API prompt,
shrink a shipped workflow's work, read what a run saved.

- :func:`only`: the id of the one node of a class in an API prompt;
- :func:`shrink`: the photo scaled to ``size`` x ``size``, the shared resolution and steps primitives set;
- :func:`saved_key` / :func:`shown_key_name`: the key file a run's SaveKey wrote, relative to the output
  folder / as the node shows it;
- :func:`add_preview`: a PreviewImage node on some image output, to read it back from the run;
- :func:`png_chunks`, :func:`pixels`, :func:`mse`: a saved PNG's chunk types, its pixels in [0, 1], their MSE.
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def only(api, class_type):
    (nid,) = [nid for nid, n in api.items() if n["class_type"] == class_type]
    return nid


def shrink(api, size, steps):
    """Scale the loaded photo to size x size, set the shared working resolution to ``size`` and the shared
    steps primitive to ``steps``."""
    load = only(api, "LoadImage")
    api["9001"] = {"class_type": "ImageScale", "inputs": {"image": [load, 0], "upscale_method": "area",
                                                          "width": size, "height": size, "crop": "center"}}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if nid != "9001" and value == [load, 0]:
                node["inputs"][name] = ["9001", 0]
    resolution = {v[0] for n in api.values() for k, v in n["inputs"].items()
                  if k == "resolution" and isinstance(v, list)}  # the primitive(s) wired to a resolution input
    for nid, node in api.items():
        if node["class_type"] == "PrimitiveInt":
            node["inputs"]["value"] = size if nid in resolution else steps
    return api


def saved_key(entry, api):
    """The key file SaveKey wrote, relative to the output folder (its UI text starts with its name in
    output/diffprivacy/, the name Load Key lists)."""
    return f"diffprivacy/{shown_key_name(entry, api)}"


def shown_key_name(entry, api):
    """The key file's name as SaveKey shows it on the node (and Load Key lists it)."""
    (text,) = entry["outputs"][only(api, "DiffPrivacySaveKey")]["text"]
    return text.split(" ")[0]


def add_preview(api, nid, image):
    api[nid] = {"class_type": "PreviewImage", "inputs": {"images": image}}


def png_chunks(png: bytes) -> list[str]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kinds.append(png[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return kinds


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0


def mse(a, b):
    return float(((a - b) ** 2).mean())
