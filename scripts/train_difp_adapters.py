"""Train DIFP's identity and style adapters (Eq. 9, then Eq. 11) over a folder of faces, outside ComfyUI.

    bash scripts/dev.sh python scripts/train_difp_adapters.py --checkpoint v1-5-pruned-emaonly.safetensors \\
        --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors --faces /data/celeba-hq --out models/ipadapter \\
        --recognizer-file models/insightface/models/buffalo_l/w600k_r50.onnx --steps 20000

Writes <name>-identity.safetensors (FaceID layout) and <name>-style.safetensors (IP-Adapter layout) into --out,
checkpointing <name>.train.pt every --checkpoint-every steps; run it again to resume (Ctrl-C checkpoints first).
A GPU job: the paper's settings are Adam, lr 10^-4.5, weight decay 1e-3, batch 16 (the defaults here).
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="SD 1.5 checkpoint file")
    ap.add_argument("--clip-vision", required=True, help="CLIP vision file (ViT-H for IP-Adapter compatibility)")
    ap.add_argument("--faces", required=True, help="folder of face photos")
    ap.add_argument("--out", required=True, help="output folder (models/ipadapter)")
    ap.add_argument("--name", default="difp")
    ap.add_argument("--recognizer", default="arcface-r50")
    ap.add_argument("--recognizer-file", default=None, help="the recognizer's weights (e.g. buffalo_l w600k_r50.onnx)")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=10 ** -4.5)
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--stage1-fraction", type=float, default=0.5)
    ap.add_argument("--drop-probability", type=float, default=0.4)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args()

    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.clip_vision
    import comfy.sd
    from diffprivacy.guidance.face.base import FaceModel
    from diffprivacy.guidance.face.loader import load_detector, load_recognizer
    from diffprivacy.methods import difp_training as dt

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
        vision = comfy.clip_vision.load(args.clip_vision)
        recognizer = load_recognizer(args.recognizer, path=args.recognizer_file)
        face_model = FaceModel(load_detector(args.detector), recognizer)
    options = dt.DIFPTrainingOptions(steps=args.steps, stage1_fraction=args.stage1_fraction,
                                     drop_probability=args.drop_probability, batch_size=args.batch_size,
                                     learning_rate=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                                     checkpoint_every=args.checkpoint_every)
    started = time.monotonic()

    def progress(step):  # a guidance.progress.Step
        if step.done == 1 or step.done % 10 == 0 or step.done == step.total:
            print(f"step {step.done}/{step.total} loss {step.detail['loss']:.5f} ({time.monotonic() - started:.0f} s)",
                  flush=True)

    try:
        with torch.inference_mode():
            result = dt.train_from_folder(model, clip, vae, vision, face_model, args.faces, args.name, options,
                                          out_dir=args.out, resume=not args.no_resume, resolution=args.resolution,
                                          progress=progress)
    except KeyboardInterrupt:
        print("interrupted: the state so far is checkpointed; run again to resume", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
