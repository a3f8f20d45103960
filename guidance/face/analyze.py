"""Face analysis for people to look at: every face found, drawn on a preview, the aligned crops the
recognizer sees with their embeddings, and identity distances between image pairs.

Images are ComfyUI IMAGE batches (B, H, W, 3) in [0, 1]; nothing here needs a server.
"""
from __future__ import annotations

import torch

from ..host import check_interrupt
from ..progress import Progress, report
from .align import align_faces, arcface_template
from .base import FaceModel, NoFaceError, choose_faces

NO_FACE_MODES = ("error", "pass through")


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """An IMAGE batch (B, H, W, 3), refusing images too small to find a face in."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be an RGB IMAGE batch (B, H, W, 3), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if image.shape[1] < 16 or image.shape[2] < 16:
        raise ValueError(f"{name} is {image.shape[2]}x{image.shape[1]} pixels: too small to find a face in")
    return image


def draw_faces(image: torch.Tensor, faces, chosen) -> torch.Tensor:
    """Boxes (green: chosen, yellow: others) and landmark dots (red) on a copy of one (H, W, 3) image."""
    out = image.clone()
    h, w = out.shape[:2]
    t = max(1, round(min(h, w) / 256))
    for f in faces:
        colour = torch.tensor([0.1, 1.0, 0.2] if any(f is c for c in chosen) else [1.0, 0.9, 0.1])
        x1, y1, x2, y2 = (int(round(float(v))) for v in f.box)
        x1, x2 = max(0, min(w - 1, x1)), max(0, min(w - 1, x2))
        y1, y2 = max(0, min(h - 1, y1)), max(0, min(h - 1, y2))
        out[y1:y1 + t, x1:x2 + 1] = colour
        out[max(y2 - t + 1, 0):y2 + 1, x1:x2 + 1] = colour
        out[y1:y2 + 1, x1:x1 + t] = colour
        out[y1:y2 + 1, max(x2 - t + 1, 0):x2 + 1] = colour
        r = 2 * t
        for x, y in f.landmarks.tolist():
            xi, yi = int(round(x)), int(round(y))
            if 0 <= xi < w and 0 <= yi < h:
                out[max(yi - r, 0):yi + r + 1, max(xi - r, 0):xi + r + 1] = torch.tensor([1.0, 0.1, 0.1])
    return out


def analyze_faces(model: FaceModel, images: torch.Tensor, mode: str = "largest", index: int = 0,
                  if_no_face: str = "error", progress: Progress | None = None):
    """Detect, choose, align and embed the faces of an IMAGE batch.

    Returns (preview IMAGE, crops IMAGE (N, S, S, 3), FACE_EMBEDDINGS dict). With
    ``if_no_face == "pass through"`` an image without a face contributes nothing (and at least
    one blank crop is returned so the IMAGE output stays valid); otherwise NoFaceError.
    """
    images = check_image(images)
    previews, rows = [], []
    for b, img in enumerate(images):
        check_interrupt()
        faces = model.detect(img)
        if not faces and if_no_face == "pass through":
            chosen = []
        else:
            chosen = choose_faces(faces, mode, index, batch_index=b)
        previews.append(draw_faces(img, faces, chosen))
        rows.extend((b, f) for f in chosen)
        report(progress, b + 1, len(images), f"image {b + 1}/{len(images)}")
    size = getattr(getattr(model, "recognizer", None), "crop_size", 112)
    if not rows:
        empty = {"embeddings": torch.zeros(0, 0), "batch_index": [], "boxes": torch.zeros(0, 4),
                 "landmarks": torch.zeros(0, 5, 2), "scores": [], "model": model.name, "metric": model.metric}
        return torch.stack(previews), torch.zeros(1, size, size, 3), empty
    embs, crops = [], []
    rec = getattr(model, "recognizer", None)
    template = rec.template() if rec is not None else arcface_template(size)
    for b, f in rows:
        x = images[b].permute(2, 0, 1).unsqueeze(0)
        lm = f.landmarks.unsqueeze(0)
        with torch.no_grad():
            embs.append(model.embed(x, lm).float().cpu())
            crops.append(align_faces(x, lm, template, size)[0].permute(1, 2, 0).clamp(0, 1).cpu())
    result = {
        "embeddings": torch.cat(embs),
        "batch_index": [b for b, _ in rows],
        "boxes": torch.stack([f.box for _, f in rows]),
        "landmarks": torch.stack([f.landmarks for _, f in rows]),
        "scores": [f.score for _, f in rows],
        "model": model.name,
        "metric": model.metric,
    }
    return torch.stack(previews), torch.stack(crops), result


def identity_distances(model: FaceModel, image_a: torch.Tensor, image_b: torch.Tensor,
                       if_no_face: str = "error"):
    """Distance between the largest face of image_a[i] and of image_b[i] (a single image pairs with all).

    Returns (distances list, verdict list (True = same identity), report text). A pair where a
    face is missing gets distance NaN and verdict None with ``if_no_face == "pass through"``.
    """
    a, b = check_image(image_a, "image_a"), check_image(image_b, "image_b")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"image_a has {a.shape[0]} images and image_b {b.shape[0]}: give equal batches, or one "
                         f"image to compare with every image of the other batch")
    n = max(a.shape[0], b.shape[0])

    def embed_one(batch, i, name):
        img = batch[min(i, batch.shape[0] - 1)]
        faces = model.detect(img)
        if not faces:
            if if_no_face == "pass through":
                return None
            raise NoFaceError(min(i, batch.shape[0] - 1), f"in {name}")
        face = choose_faces(faces, "largest")[0]
        with torch.no_grad():
            return model.embed(img.permute(2, 0, 1).unsqueeze(0), face.landmarks.unsqueeze(0))

    dists, verdicts, lines = [], [], []
    cache: dict = {}
    for i in range(n):
        check_interrupt()
        ka, kb = ("a", min(i, a.shape[0] - 1)), ("b", min(i, b.shape[0] - 1))
        if ka not in cache:
            cache[ka] = embed_one(a, i, "image_a")
        if kb not in cache:
            cache[kb] = embed_one(b, i, "image_b")
        ea, eb = cache[ka], cache[kb]
        if ea is None or eb is None:
            dists.append(float("nan"))
            verdicts.append(None)
            lines.append(f"pair {i}: no face in {'image_a' if ea is None else 'image_b'}")
            continue
        d = float(model.distance(ea, eb)[0])
        same = d < model.threshold
        dists.append(d)
        verdicts.append(same)
        verdict = "same identity" if same else "different identity"
        lines.append(f"pair {i}: {model.metric} distance {d:.4f} -> {verdict}")
    header = f"{model.name}: threshold {model.threshold:g} ({model.metric}; same identity iff distance < threshold)"
    return dists, verdicts, "\n".join([header] + lines)
