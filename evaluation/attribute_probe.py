"""Attribute preservation, measured by a linear probe (thesis ch. 6's purpose: an anonymized dataset that still
trains attribute models).

A logistic-regression probe is fitted on image features of the ORIGINALS with the user's attribute labels (a
JSON: file name -> label, e.g. {"img1.jpg": "smiling", ...}; faces-13id has no attribute labels, and none are made
up here), then applied to the anonymized images. Reported: the probe's accuracy on the originals (cross-validated,
so it is not scored on what it was fitted to), its accuracy on the anonymized images against the same labels, and
the agreement between its predictions on each original and on its anonymized version. Features are any (N, D)
tensor; :func:`clip_vision_features` gives the CLIP-vision image embedding the dataset command pairs with.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def load_attribute_labels(path: str | Path) -> dict[str, str]:
    """{file name: label} from a JSON object (values any JSON scalar, compared as strings)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must hold a JSON object mapping image file names to attribute labels")
    return {str(k): str(v) for k, v in data.items()}


@torch.no_grad()
def clip_vision_features(clip_vision, images: list[torch.Tensor]) -> torch.Tensor:
    """(N, D) CLIP-vision image embeddings (ComfyUI's encode_image, its own preprocessing) of (H, W, 3) images."""
    rows = []
    for img in images:
        out = clip_vision.encode_image(img[None, ..., :3].float())
        rows.append(out["image_embeds"].float().cpu().reshape(1, -1))
    return torch.cat(rows)


def probe_agreement(original_features: torch.Tensor, anonymized_features: torch.Tensor, labels: list[str],
                    folds: int = 5, seed: int = 0) -> dict:
    """Fit the probe on the originals, test it on the anonymized images (row i of both is the same image)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_o = np.asarray(original_features, dtype=np.float64)
    x_a = np.asarray(anonymized_features, dtype=np.float64)
    y = np.asarray(labels)
    if x_o.shape != x_a.shape or len(y) != len(x_o):
        raise ValueError(f"features of the originals {x_o.shape} and of the anonymized images {x_a.shape} must pair "
                         f"row by row, with one label each ({len(y)} labels)")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError("the attribute labels hold one class only: a probe needs at least two")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise ValueError(f"every attribute class needs at least two images (class counts {dict(zip(classes, counts))})")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = cross_val_predict(probe, x_o, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    probe.fit(x_o, y)
    on_originals, on_anonymized = probe.predict(x_o), probe.predict(x_a)
    return {"n": int(len(y)), "classes": [str(c) for c in classes], "cv_folds": k,
            "accuracy_originals_cv": float((cv == y).mean()),
            "accuracy_anonymized": float((on_anonymized == y).mean()),
            "agreement": float((on_anonymized == on_originals).mean()),
            "chance": float(counts.max() / counts.sum())}
