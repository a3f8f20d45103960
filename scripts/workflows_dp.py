"""Workflow of DP-Image on the identity embedding (thesis ch. 4): a differentially private identity release."""
from workflow_builder import Graph
from workflows_identity import add_arcface, add_faceid_adapter

SD15 = "v1-5-pruned-emaonly.safetensors"

NOTE = ("What: a differentially private identity release (DP-Image, thesis ch. 4): the face's ArcFace embedding is "
        "clipped to radius C (sensitivity 2C), Gaussian noise sigma is added, and epsilon comes from Google's "
        "dp-accounting (the thesis's own looser bound is shown beside it, labelled). Strict rendering generates a new "
        "image from fresh noise and a fixed prompt, so the image depends on the original only through the noised "
        "embedding and the DP statement holds. Strict takes the checkpoint's MODEL and CLIP as loaded and encodes the "
        "prompt text itself: a MODEL with streams, attention patches or LoRAs, or a connected CONDITIONING, is "
        "refused by name, and the label is computed from what went in. Switch DP Render to 'in the photo' to "
        "inpaint the original's face instead: NOT differentially private. The label travels with the image as a "
        "JSON sidecar.\n"
        "Where: SD 1.5 checkpoint in Load Checkpoint; the photo as face.png in ComfyUI's input folder; "
        "ip-adapter-faceid_sd15.bin in models/ipadapter/ (+ its LoRA in models/loras/); the buffalo_l pack in "
        "models/insightface/models/.\n"
        "Settings that matter: sigma (or a target epsilon) and delta on DP Identity. At any useful epsilon the "
        "released identity is essentially random (sigma 1: cosine about 0.04, epsilon about 10). Keep noise_seed 0 "
        "(secret noise): a fixed noise seed is saved in the workflow and undoes the privacy. Every new run with fresh "
        "noise is another release of the same face: the epsilons add up.")


def dp_identity():
    g = Graph("dp-identity",
              "A differentially private identity release (DP-Image, thesis ch. 4, on FaceID's ArcFace embedding): "
              "clip + Gaussian noise with epsilon from dp-accounting, rendered strictly (generation from fresh noise "
              "with the noised identity stream and a fixed prompt), saved with its privacy label as a JSON sidecar. "
              "Needs models/ipadapter/ip-adapter-faceid_sd15.bin (+ its LoRA in models/loras/) and "
              "models/insightface/models/buffalo_l/.", note=NOTE)
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    photo = g.node("LoadImage", title="original photo", image="face.png")
    face_model = add_arcface(g)
    adapter = add_faceid_adapter(g)
    g.stage("Release the identity (DP)")
    emb = g.node("DiffPrivacyFaceEmbedding", image=photo.out(0), face_model=face_model.out(0), face="largest")
    dp = g.node("DiffPrivacyDPIdentity", face_embedding=emb.out(0), clip_radius=1.0, noise_by="sigma", sigma=1.0,
                target_epsilon=10.0, delta=1e-5, rounds=1, renormalize=True, noise_seed=0)
    g.node("PreviewAny", title="epsilon report", source=dp.out(1))
    g.stage("Render (strict) and save with the label")
    render = g.node("DiffPrivacyDPRender", model=ckpt.out(0), vae=ckpt.out(2), clip=ckpt.out(1),
                    prompt="a portrait photo of a person, neutral background",
                    negative_prompt="blurry, lowres, deformed", identity_adapter=adapter.out(0),
                    noised_embedding=dp.out(0), mode="strict",
                    seed=0, steps=30, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras", width=512, height=512,
                    identity_weight=1.0, denoise=0.8, face_model=face_model.out(0))
    g.node("PreviewAny", title="privacy label", source=render.out(1))
    g.node("DiffPrivacySaveDPImage", images=render.out(0), privacy_label=render.out(1),
           filename_prefix="diffprivacy/dp-identity")
    return g


def workflows():
    return [dp_identity()]
