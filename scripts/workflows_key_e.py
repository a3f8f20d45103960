"""Workflows of Key-E learning (Diff-Privacy Stage I).

- learn-key-e: a face image -> Key-E file (plus the loss curve), with the paper's defaults.
- ``add_learn_key_e``: the same nodes inside another graph, so the anonymize / hide / recover
  workflows can get a variant that learns Key-E first (their Key-E input = its output 0).
"""
from workflow_builder import Graph

SD15 = "v1-5-pruned-emaonly.safetensors"
CLIP_VISION = "clip-vit-large-patch14.safetensors"
LOAD, LEARN = "Load", "Learn Key-E"  # stage (group) titles shared by the workflows that learn Key-E


def add_learn_key_e(g: Graph, ckpt, image, clip_vision=None, **settings):
    """Add Learn Key-E (and its loss-curve preview) to ``g``; returns the node (outputs: key_e, uncond,
    loss_curve, key_e_path). The CLIP-vision loader goes in the Load stage, the rest in Learn Key-E."""
    if clip_vision is None:
        g.stage(LOAD)
        clip_vision = g.node("CLIPVisionLoader", clip_name=CLIP_VISION)
    g.stage(LEARN)
    learn = g.node("DiffPrivacyLearnKeyE", model=ckpt.out(0), clip=ckpt.out(1), vae=ckpt.out(2),
                   clip_vision=clip_vision.out(0), image=image.out(0), **settings)
    g.node("PreviewImage", title="loss curve", images=learn.out(2))
    return learn


def workflows():
    g = Graph("learn-key-e",
              "Diff-Privacy Stage I: learns Key-E (ten conditional embeddings C^0..C^9) of a face image by training "
              "the multi-scale image inversion module against the frozen SD 1.5 model, and writes it to a Key-E "
              "file under output/diffprivacy/ (set a password to seal it). Defaults follow the authors' code: "
              "6100 steps, AdamW lr 1e-4 (the paper says 1e-3), batch 1, random flip, seed 23. Cancel keeps the "
              "best Key-E so far; resume_path continues a run.",
              note="What: learns Key-E of your photo (Diff-Privacy Stage I) and writes it to "
                   "output/diffprivacy/key_e_*.safetensors, for the anonymize and hide workflows.\n"
                   "Where: SD 1.5 checkpoint in Load Checkpoint, CLIP-vision ViT-L/14 in Load CLIP Vision, your photo "
                   "in Load Image (upload it, or put it in input/ as face.png).\n"
                   "Settings that matter: steps (the authors' 6100 takes long on a CPU; Cancel keeps the best Key-E so "
                   "far), resolution (512, as protection uses), and a password to seal the file.")
    g.stage(LOAD)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    add_learn_key_e(g, ckpt, image, filename_prefix="diffprivacy/key_e")
    return [g]
