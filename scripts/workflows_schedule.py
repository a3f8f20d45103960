"""Workflows of the embedding schedule (no learning, no guidance)."""
from workflow_builder import Graph

SD15 = "v1-5-pruned-emaonly.safetensors"


def workflows():
    g = Graph("embedding-schedule",
              "Img2img of a face under the Diff-Privacy embedding schedule with stock KSampler: text prompts stand "
              "in for Key-E (ten stage conditionings), UC below tau*T. DDIM, 50 steps, noising to 0.6 T, cfg 1.",
              note="What: img2img of your photo under the Diff-Privacy embedding schedule, run by the stock KSampler; "
                   "text prompts stand in for the learnt Key-E (nothing is learnt, no face model is needed).\n"
                   "Where: your SD 1.5 checkpoint in Load Checkpoint; your photo in Load Image (upload it, or put "
                   "it in ComfyUI's input/ folder as face.png).\n"
                   "Settings that matter: tau on Embedding Schedule (UC where t <= tau*T, paper 0.4), and KSampler's "
                   "denoise (the noise strength S_ns, paper 0.6) and steps (50).")
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    g.stage("Sample and save")
    latent = g.node("VAEEncode", pixels=image.out(0), vae=ckpt.out(2))
    g.stage("Embedding schedule")
    sched = g.node("DiffPrivacyEmbeddingSchedule", clip=ckpt.out(1), tau=0.4,
                   stage_text="a photo of a person, detailed face")
    g.stage("Sample and save")
    sampled = g.node("KSampler", model=ckpt.out(0), positive=sched.out(0), negative=sched.out(1),
                     latent_image=latent.out(0), seed=0, steps=50, cfg=1.0, sampler_name="ddim",
                     scheduler="ddim_uniform", denoise=0.6)
    decoded = g.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    g.node("SaveImage", images=decoded.out(0), filename_prefix="diffprivacy/schedule")
    return [g]
