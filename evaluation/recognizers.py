"""Evaluation recognizers by name: ``dlib`` (this pack's dlib ResNet, L2 0.6) or a recognizer of
``guidance.face.loader`` (``facenet-casia``, ``arcface-r50``, ...) with a detector, written
``recognizer@detector`` (default detector: mtcnn). Thresholds: each recognizer's own (FaceNet L2
1.1, ArcFace as its loader sets it, dlib 0.6) unless ``=value`` is appended, e.g.
``arcface-r50@scrfd=0.8``.
"""
from __future__ import annotations


def parse_spec(spec: str) -> tuple[str, str, float | None]:
    """``name[@detector][=threshold]`` -> (name, detector, threshold or None)."""
    spec = spec.strip()
    threshold = None
    if "=" in spec:
        spec, t = spec.split("=", 1)
        try:
            threshold = float(t)
        except ValueError as e:
            raise ValueError(f"recognizer threshold must be a number, got {t!r}") from e
    name, _, detector = spec.partition("@")
    return name.strip(), (detector.strip() or "mtcnn"), threshold


def load_evaluation_model(spec: str):
    """A FACE_MODEL for ``spec`` (see module doc). Raises ValueError/ImportError/FileNotFoundError
    with what to install or where to put files."""
    name, detector, threshold = parse_spec(spec)
    if name == "dlib":
        from ..guidance.face.dlib_face import load_dlib_face_model
        model = load_dlib_face_model()
    else:
        from ..guidance.face.loader import RECOGNIZERS, load_face_model
        if name not in RECOGNIZERS:
            raise ValueError(f"unknown recognizer {name!r}; choose dlib or one of {RECOGNIZERS}")
        model = load_face_model(detector=detector, recognizer=name)
    if threshold is not None:
        import copy
        model = copy.copy(model)  # the loaders cache models: never change a shared one
        model.threshold = threshold
    return model


def detector_name(model) -> str:
    det = getattr(model, "detector", None)
    return getattr(det, "name", None) or ("dlib-hog" if hasattr(model, "detect_68") else model.name)
