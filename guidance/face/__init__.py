"""Face models: detection with 5 landmarks, differentiable alignment, differentiable recognizers.

``base`` defines the FACE_MODEL contract (:class:`FaceModel`, :class:`Face`, :func:`choose_faces`);
``loader`` finds model files in ComfyUI's folders and assembles cached FaceModels.
"""
from .base import CHOOSE_MODES, Detector, Face, FaceModel, NoFaceError, Recognizer, choose_faces, pairwise_distance

__all__ = ["CHOOSE_MODES", "Detector", "Face", "FaceModel", "NoFaceError", "Recognizer", "choose_faces",
           "pairwise_distance"]
