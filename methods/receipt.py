"""The receipt of a protect node: per face, what the delivered image really does.

Measured on the delivered image at the photo's full resolution after 8-bit rounding (what a saved PNG holds),
never on a stand-in (a working-resolution crop, a one-step estimate), for every face the pipeline protected:

- **found**: whether the receipt's face detector finds a face there (IoU >= :data:`MATCH_IOU` with the face's
  box in the original);
- **distance**: the identity distance between the original face and the delivered one under a recognizer the
  method did NOT use for guidance (a method steered against its own recognizer fools it first): dlib's
  ResNet (L2, threshold 0.6) by default (:func:`receipt_recognizer`), with its name and threshold;
- **verdict**: "still recognised" (distance < threshold) or "not recognised";
- **crop size**: the side of the square the face was cut with, in photo pixels, and the working resolution.

:func:`measure_receipt` returns a dict (JSON-ready: the node's STRING output and ``ui`` text are its JSON and
:func:`receipt_text`; :func:`manifest_fields` flattens it for a dataset manifest row).
"""
from __future__ import annotations

import json

import torch

from ..guidance.face.base import Face
from .pipeline import FULL_SIZE, Plan

RECEIPT_VERSION = 1
MATCH_IOU = 0.3
STILL = "still recognised"
NOT = "not recognised"


def round_to_8bit(image: torch.Tensor) -> torch.Tensor:
    """What an 8-bit image file holds of a float image in [0, 1]."""
    return (image.float().clamp(0, 1) * 255.0).round() / 255.0


def receipt_recognizer(guided_by=None, override=None):
    """The receipt's FACE_MODEL: ``override`` when given, else dlib's recognizer (the evaluation one, never a
    guidance one: it is not differentiable). Refuses the recognizer the method was guided by."""
    name = getattr(guided_by, "name", None)
    if override is not None:
        if override is guided_by or (name is not None and getattr(override, "name", None) == name):
            raise ValueError(f"the receipt's recognizer is {name}, the one the method steered against: a method "
                             "fools its own recognizer first, so its receipt must use another (dlib by default, or "
                             "FaceNet-CASIA when the method used ArcFace)")
        return override
    from ..guidance.face.dlib_face import load_dlib_face_model
    return load_dlib_face_model()


def _iou(a, b) -> float:
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _match(faces: list[Face], box) -> Face | None:
    best = max(faces, key=lambda f: _iou(f.box, box), default=None)
    return best if best is not None and _iou(best.box, box) >= MATCH_IOU else None


def _targets(plan: Plan, found_in_original: list[Face]):
    """(crop, reference box) per protected face; in whole-frame mode every face found in the original."""
    if plan.mode == "whole frame":
        crop = plan.crops[0]
        return [(crop, tuple(float(v) for v in f.box), i) for i, f in enumerate(found_in_original)]
    return [(c, c.face_box, c.face_index) for c in plan.crops]


def measure_receipt(original: torch.Tensor, delivered: torch.Tensor, plan: Plan, recognizer, *,
                    guided_by=None, method: str = "") -> dict:
    """The receipt of ``delivered`` (k, H, W, 3) (or one (H, W, 3)) protected from ``original`` (H, W, 3) by the
    crops of ``plan``, under ``recognizer`` (see :func:`receipt_recognizer`)."""
    original = round_to_8bit(original[0] if original.dim() == 4 else original)[..., :3]
    delivered = round_to_8bit(delivered if delivered.dim() == 4 else delivered[None])[..., :3]
    if tuple(delivered.shape[1:3]) != tuple(original.shape[:2]):
        raise ValueError(f"the delivered image is {delivered.shape[2]}x{delivered.shape[1]} but the original is "
                         f"{original.shape[1]}x{original.shape[0]}: a receipt compares them at the photo's size")
    threshold = float(recognizer.threshold)
    in_original = recognizer.detect(original)
    references = {}
    outputs = []
    for k, image in enumerate(delivered):
        in_delivered = recognizer.detect(image)
        faces = []
        for crop, box, index in _targets(plan, in_original):
            full = plan.mode == FULL_SIZE
            entry = {"face": index, "crop_size": None if full else crop.side,
                     "working_resolution": FULL_SIZE if full else crop.work_size(plan.resolution),
                     "box": [round(float(v), 1) for v in box]}
            ref = _match(in_original, box)
            landmarks = ref.landmarks if ref is not None else (torch.tensor(crop.landmarks) if crop.landmarks
                                                               else None)
            now = _match(in_delivered, ref.box if ref is not None else box)
            entry["found"] = now is not None
            if landmarks is None:
                entry.update(distance=None, recognised=None,
                             verdict=f"not measured: {recognizer.name} finds no face there in the original")
                faces.append(entry)
                continue
            with torch.no_grad():
                if index not in references:
                    references[index] = recognizer.embed(original.permute(2, 0, 1)[None], landmarks[None].float())
                here = now.landmarks if now is not None else landmarks
                emb = recognizer.embed(image.permute(2, 0, 1)[None], here[None].float())
            distance = float(recognizer.distance(references[index], emb)[0])
            entry.update(distance=round(distance, 4), recognised=distance < threshold,
                         verdict=STILL if distance < threshold else NOT)
            if now is None:
                entry["note"] = "no face found there in the delivered image: embedded at the original's landmarks"
            faces.append(entry)
        outputs.append({"output": k, "faces": faces})
    return {"receipt_version": RECEIPT_VERSION, "method": method, "recognizer": recognizer.name,
            "metric": recognizer.metric, "threshold": threshold,
            "guided_by": getattr(guided_by, "name", None),
            "measured_on": f"the delivered image, {original.shape[1]}x{original.shape[0]}, rounded to 8 bits",
            "pipeline": {"mode": plan.mode, "resolution": plan.resolution}, "outputs": outputs}


def unavailable_receipt(reason: str, method: str = "") -> dict:
    """The receipt when none could be measured (no recognizer installed): it says so, never a verdict."""
    return {"receipt_version": RECEIPT_VERSION, "method": method, "recognizer": None, "error": reason,
            "outputs": []}


def receipt_json(receipt: dict) -> str:
    return json.dumps(receipt, sort_keys=True)


def receipt_text(receipt: dict) -> str:
    """A few lines for the node: per output and face, the verdict, the distance and the crop size."""
    if receipt.get("error"):
        return f"receipt: not measured ({receipt['error']})"
    lines = [f"receipt ({receipt['recognizer']}, {receipt['metric']} threshold {receipt['threshold']:g}; guided by "
             f"{receipt.get('guided_by') or 'no recognizer'}), on {receipt['measured_on']}:"]
    for out in receipt["outputs"]:
        for f in out["faces"]:
            d = "-" if f["distance"] is None else f"{f['distance']:.3f}"
            crop = (f"crop {f['crop_size']} px -> {f['working_resolution']} px" if f["crop_size"] else
                    f"worked on at {f['working_resolution']}")
            lines.append(f"output {out['output']} face {f['face']}: {f['verdict']} (distance {d}; "
                         f"{'found' if f['found'] else 'NOT found'} by the detector; {crop})")
    return "\n".join(lines)


def manifest_fields(receipt: dict) -> dict:
    """The receipt as flat fields for one row of a dataset manifest."""
    faces = [f for out in receipt.get("outputs", []) for f in out["faces"]]
    measured = [f for f in faces if f.get("distance") is not None]
    return {"receipt_recognizer": receipt.get("recognizer"), "receipt_threshold": receipt.get("threshold"),
            "receipt_faces": len(faces), "receipt_found": sum(bool(f["found"]) for f in faces),
            "receipt_still_recognised": sum(bool(f["recognised"]) for f in measured),
            "receipt_min_distance": min((f["distance"] for f in measured), default=None),
            "receipt_crop_sizes": sorted({f["crop_size"] for f in faces if f["crop_size"]}),
            "receipt_error": receipt.get("error")}


def receipt_for(original: torch.Tensor, delivered: torch.Tensor, plan: Plan, options=None, *, guided_by=None,
                method: str = "") -> dict:
    """A protect node's receipt: :func:`measure_receipt` under :func:`receipt_recognizer` (the options'
    ``receipt_model`` or dlib); without dlib installed, a receipt that says why nothing was measured."""
    try:
        recognizer = receipt_recognizer(guided_by, getattr(options, "receipt_model", None))
    except ImportError as e:
        return unavailable_receipt(str(e), method)
    return measure_receipt(original, delivered, plan, recognizer, guided_by=guided_by, method=method)
