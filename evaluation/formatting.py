"""How numbers leave the pack: one cell format for tables (plots, HTML, the CLI, nodes) and one
JSON form for reports (non-finite floats as strings, tensors as lists, private keys dropped)."""
from __future__ import annotations

import json
import math

import numpy as np
import torch


def format_value(v) -> str:
    """A table cell: – for missing, yes/no, ∞/nan, 4 decimals below 10 and 2 above."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def json_safe(v):
    """``v`` with only JSON types: inf/nan as strings, numpy and torch values unwrapped, keys starting
    with "_" (in-memory extras such as embeddings) left out."""
    if isinstance(v, float):
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items() if not str(k).startswith("_")}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return json_safe(v.item())
    if isinstance(v, torch.Tensor):
        return json_safe(v.tolist())
    return v


def to_json(v, indent: int = 1) -> str:
    return json.dumps(json_safe(v), indent=indent)
