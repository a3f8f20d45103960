"""Key security (paper A.3.1, Fig. 7): recover with a wrong Key-I, a wrong Key-E, the
unconditional embedding as Key-E, and the correct key; only the correct key should bring the
original back (high PSNR/SSIM, recognized as the same person)."""
from __future__ import annotations

import torch

from .analysis import analyse_face, embed_at
from .identity import cos_ie, identity_distance
from .images import match_size
from .pixel_metrics import all_pixel_metrics

VARIANTS = ("wrong Key-I", "wrong Key-E", "UC as Key-E", "correct key")


def key_security_table(original: torch.Tensor, recovered: dict[str, torch.Tensor], models: dict | None = None
                       ) -> list[dict]:
    """One row per recovery variant: pixel metrics vs the original and, per model, the identity
    distance, Cos-IE and whether the recognizer still matches it to the original.

    original: (H, W, 3); recovered: variant name -> (H, W, 3) (any of :data:`VARIANTS` or
    others, e.g. "wrong keys"); models: name -> FACE_MODEL. A recovered image of another size is
    resized to the original's. Recovered faces are embedded at the original's landmarks.
    """
    models = models or {}
    anchors = {}
    for name, model in models.items():
        a = analyse_face(model, original)
        if not a.detected:
            raise ValueError(f"{name}: no face was detected in the original, so identities cannot be compared")
        anchors[name] = (model, a)
    rows = []
    for variant, img in recovered.items():
        img = match_size(img, original)
        row = {"variant": variant, **all_pixel_metrics(original, img)}
        for name, (model, a) in anchors.items():
            e = embed_at(model, img, a.landmarks)
            d = identity_distance(model, a.embedding, e)
            row[f"{name} distance"] = d
            row[f"{name} cos_ie"] = cos_ie(a.embedding, e)
            row[f"{name} same person"] = d < model.threshold
        rows.append(row)
    return rows


def key_security_figure(original: torch.Tensor, recovered: dict[str, torch.Tensor], rows: list[dict]):
    from .plots import image_grid_figure
    images = [("original", original)] + [(k, match_size(v, original)) for k, v in recovered.items()]
    captions = [""] + [f"PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.3f}" for r in rows]
    return image_grid_figure("Recovery with different keys (paper Fig. 7)", images, captions)
