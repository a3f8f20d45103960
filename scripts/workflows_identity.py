"""Workflows of the identity and style streams (IP-Adapter / IP-Adapter-FaceID on your SD 1.5 checkpoint)."""
from workflow_builder import Graph

SD15 = "v1-5-pruned-emaonly.safetensors"
FACEID = "ip-adapter-faceid_sd15.bin"


def add_arcface(g, **title):
    """Face Model Loader with ArcFace r50 of buffalo_l: FaceID's identity space (any detector the machine has)."""
    return g.node("DiffPrivacyFaceModelLoader", **title, detector="auto", recognizer="arcface-r50",
                  insightface_pack="buffalo_l")


def add_faceid_adapter(g, **title):
    """The FaceID adapter (its LoRA attached when present)."""
    return g.node("DiffPrivacyIdentityAdapterLoader", **title, adapter_name=FACEID, lora_name="auto",
                  lora_strength=0.8)
DONOR = "donor.png"  # any photo of the person whose identity is transferred


def identity_from_donor():
    g = Graph("identity-from-donor",
              "A donor photo's identity onto an img2img of another photo: the donor's ArcFace embedding (insightface "
              "buffalo_l w600k_r50, the space FaceID was trained in) drives IP-Adapter-FaceID's identity stream on "
              "every cross-attention layer of your SD 1.5 model; the stock KSampler runs it (the negative gets the "
              "zero-embedding tokens). Needs models/ipadapter/ip-adapter-faceid_sd15.bin, its LoRA "
              "models/loras/ip-adapter-faceid_sd15_lora.safetensors and models/insightface/models/buffalo_l/.",
              "What: puts the identity of the face in a donor photo onto an img2img of another photo, through "
              "IP-Adapter-FaceID's identity stream on your SD 1.5 model, sampled by the stock KSampler.\n"
              "Where: checkpoint in Load Checkpoint; models/ipadapter/ip-adapter-faceid_sd15.bin and its LoRA in "
              "models/loras/; insightface buffalo_l in models/insightface/models/; the photos in the two Load Image "
              "nodes (upload them, or put donor.png and face.png in ComfyUI's input/ folder).\n"
              "Settings that matter: identity_weight (0.9) and the LoRA strength (0.8); KSampler's denoise (0.65) "
              "keeps more or less of the photo being changed.")
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    donor = g.node("LoadImage", title="donor photo (the identity)", image=DONOR)
    target = g.node("LoadImage", title="photo to change", image="face.png")
    g.stage("Donor's face")
    face_model = add_arcface(g)
    emb = g.node("DiffPrivacyFaceEmbedding", image=donor.out(0), face_model=face_model.out(0), face="largest")
    g.node("PreviewImage", title="donor face as FaceID sees it", images=emb.out(1))
    g.stage("Identity stream")
    adapter = add_faceid_adapter(g)
    model = g.node("DiffPrivacyApplyIdentityStreams", model=ckpt.out(0), identity_adapter=adapter.out(0),
                   face_embedding=emb.out(0), identity_weight=0.9, style_weight=0.0)
    g.stage("Sample and save")
    pos = g.node("CLIPTextEncode", clip=ckpt.out(1), text="a photo of a person, detailed face")
    neg = g.node("CLIPTextEncode", clip=ckpt.out(1), text="blurry, lowres, deformed")
    latent = g.node("VAEEncode", pixels=target.out(0), vae=ckpt.out(2))
    sampled = g.node("KSampler", model=model.out(0), positive=pos.out(0), negative=neg.out(0),
                     latent_image=latent.out(0), seed=0, steps=30, cfg=5.0, sampler_name="dpmpp_2m",
                     scheduler="karras", denoise=0.65)
    decoded = g.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    g.node("DiffPrivacySaveImageClean", images=decoded.out(0), filename_prefix="diffprivacy/identity-streams")
    return g


def workflows():
    return [identity_from_donor()]
