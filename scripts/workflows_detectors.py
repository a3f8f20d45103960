"""Workflow of the thesis ch. 3 method: hide faces from detectors with an invisible perturbation.

- hide-from-detectors: face.png -> DiffPrivacyHideFromDetectors (MTCNN, R_p 3, default steps) -> a clean PNG
  (no metadata), the perturbation made visible, and the JSON report (which faces are still detected).
"""
from workflow_builder import Graph


def hide_from_detectors():
    g = Graph("hide-from-detectors",
              "Hides the faces of face.png from face detectors (Xue thesis ch. 3) with a perturbation of at most "
              "3 levels out of 255, and saves it as PNG without metadata. The report says, per face, whether the "
              "detector still finds it. Only lossless saving keeps the protection: JPEG re-compression, resizing or "
              "a screenshot can undo it (turn on 'robust' and raise the range for that). Choose which faces to "
              "hide with private_faces (all, largest, indices, or a mask).")
    image = g.node("LoadImage", image="face.png")
    hide = g.node("DiffPrivacyHideFromDetectors", image=image.out(0), detectors="mtcnn", private_faces="all")
    g.node("DiffPrivacySaveImageClean", images=hide.out(0), filename_prefix="diffprivacy/hidden-from-detectors")
    g.node("PreviewImage", title="perturbation (grey = unchanged)", images=hide.out(1))
    g.node("PreviewAny", title="report (JSON)", source=hide.out(2))
    return g


def workflows():
    return [hide_from_detectors()]
