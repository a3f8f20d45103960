"""Workflows of the embedding schedule (no learning, no guidance)."""
from workflow_builder import Graph

SD15 = "v1-5-pruned-emaonly.safetensors"


def workflows():
    g = Graph("embedding-schedule",
              "Img2img of a face under the Diff-Privacy embedding schedule with stock KSampler: text prompts stand "
              "in for Key-E (ten stage conditionings), UC below tau*T. DDIM, 50 steps, noising to 0.6 T, cfg 1.")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    latent = g.node("VAEEncode", pixels=image.out(0), vae=ckpt.out(2))
    sched = g.node("DiffPrivacyEmbeddingSchedule", clip=ckpt.out(1), tau=0.4,
                   stage_text="a photo of a person, detailed face")
    sampled = g.node("KSampler", model=ckpt.out(0), positive=sched.out(0), negative=sched.out(1),
                     latent_image=latent.out(0), seed=0, steps=50, cfg=1.0, sampler_name="ddim",
                     scheduler="ddim_uniform", denoise=0.6)
    decoded = g.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    g.node("SaveImage", images=decoded.out(0), filename_prefix="diffprivacy/schedule")
    return [g]
