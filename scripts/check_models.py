"""Says which model files the Diff-Privacy workflows need and where to put them (used by scripts/run.sh).

    python scripts/check_models.py MODELS_DIR [MORE_MODELS_DIR | EXTRA_MODEL_PATHS_YAML ...]
    python scripts/check_models.py --write-yaml OUT.yaml EXISTING_COMFYUI_MODELS_DIR

The hints name MODELS_DIR, the first folder given (``run.sh --models DIR``: the user's own).
"""
from __future__ import annotations

import sys
from pathlib import Path

# Every models/ subfolder the pack or its workflows read (grep the code for folder names when adding one):
# ComfyUI's own loaders, and the pack's face (insightface, facenet, facedetection, mediapipe), IP-Adapter
# (ipadapter), tiny-decoder (vae_approx) and LPIPS (lpips) folders. ``run.sh --models DIR`` maps each to DIR/<it>/.
FOLDERS = ["checkpoints", "clip_vision", "vae", "vae_approx", "loras", "embeddings", "ipadapter", "insightface",
           "facenet", "facedetection", "mediapipe", "lpips"]

NEEDS = [
    ("checkpoints", ("*.safetensors", "*.ckpt"), "an SD 1.5 checkpoint, e.g. v1-5-pruned-emaonly.safetensors "
     "(the workflows name that file; any SD 1.5 checkpoint works once selected in the loader)"),
    ("clip_vision", ("*.safetensors",), "CLIP-vision ViT-L/14 for Key-E learning, saved as "
     "clip-vit-large-patch14.safetensors (openai/clip-vit-large-patch14's vision tower)"),
    ("insightface/models", ("*/*.onnx",), "an insightface model pack folder, e.g. antelopev2/ "
     "(scrfd_10g_bnkps.onnx + glintr100.onnx) or buffalo_l/ (det_10g.onnx + w600k_r50.onnx)"),
]


def write_yaml(out: Path, models: Path) -> None:
    lines = ["diffprivacy_user_models:", f"    base_path: {models.resolve()}"]
    lines += [f"    {f}: {f}/" for f in FOLDERS]
    out.write_text("\n".join(lines) + "\n")


def roots(models: Path, more: list[str]) -> list[Path]:
    """``models`` first, then the other folders and the base paths of the YAML files given, each once."""
    found = [models.resolve()]
    for item in more:
        if item.endswith((".yaml", ".yml")):
            import yaml
            confs = (yaml.safe_load(Path(item).read_text()) or {}).values()
            bases = [Path(conf.get("base_path", ".")) for conf in confs]
        else:
            bases = [Path(item)]
        found += [b.resolve() for b in bases if b.resolve() not in found]
    return found


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write-yaml"]:
        write_yaml(Path(argv[1]), Path(argv[2]))
        return 0
    bases = roots(Path(argv[0]), argv[1:])
    missing = []
    for folder, patterns, what in NEEDS:
        if not any(any((b / folder).glob(p)) for b in bases for p in patterns):
            missing.append(f"  - {what}\n    into {bases[0] / folder}/")
    if missing:
        print("[diff-privacy] model files the workflows need are missing (nothing is downloaded for you):")
        print("\n".join(missing))
        return 1
    print("[diff-privacy] model folders: " + ", ".join(str(b) for b in bases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
