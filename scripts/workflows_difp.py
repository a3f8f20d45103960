"""Workflows of DIFP (You et al., Entropy 2024): protection under a donor identity and a style with realism control,
and recovery from the DIFP key."""
from workflow_builder import Graph
from workflows_identity import add_arcface, add_faceid_adapter

SD15 = "v1-5-pruned-emaonly.safetensors"
STYLE = "ip-adapter_sd15.safetensors"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
STYLE_IMAGE = "style.png"  # any image of the look wanted (a painting, a stock photo): not the person

PROTECT_NOTE = (
    "What: DIFP protection. The face is regenerated from the photo noised to S_n*T under a donor identity (by default "
    "a synthetic one: no donor photo needed) and a style, with dual classifier-free guidance (s_id, s_sty) and "
    "low-pass realism control (g_rea); only a feathered region around the face changes. The key (F_i + F_e) is saved "
    "next to the images: with its password it recovers the original (workflow difp-recover).\n"
    "Which sources, and why: style_source = another image (style.png), as the paper takes I_sty from 'an image of any "
    "style': the photo itself as style would feed its CLIP appearance, identity cues included, back into every step. "
    "realism_reference = original: the new face must fit the photo's pose and light, which is what realism control "
    "is for; its cost is that the original's coarse structure (face shape, pose, skin tone, light: H = 26 of 64 "
    "latent cells at g_rea 0.6) survives. Raise g_rea or choose 'none' to copy less; choose 'another image' to copy "
    "nothing of the original.\n"
    "Where: SD 1.5 checkpoint in Load Checkpoint; the photo as face.png and a style image as style.png in ComfyUI's "
    "input folder; "
    "ip-adapter-faceid_sd15.bin and ip-adapter_sd15.safetensors in models/ipadapter/ (+ the FaceID LoRA in "
    "models/loras/); CLIP-ViT-H-14 in models/clip_vision/; the buffalo_l pack in models/insightface/models/.\n"
    "Settings that matter: strength S_n (0.8; above 1 is refused), g_rea (0.6; 0 copies the photo, 1 frees it), s_id "
    "and s_sty (unreported by the paper: 1.0 each here). Type a password into Save DIFP Key before sharing anything.")

RECOVER_NOTE = (
    "What: DIFP recovery. DDIM from the key's F_i (the face crop) under its condition, each step pulled towards the "
    "original's identity stored in the key (Eq. 17, adapted); the recovered face is pasted back into the protected "
    "photo where it was cut (the key holds nothing of the photo outside the face).\n"
    "Where: pick the key file in Load DIFP Key (saved by difp-protect under output/diffprivacy/; press R "
    "to list a new one) and type its password; the protected photo in Load Image (protected.png in ComfyUI's input/ "
    "folder); the same SD 1.5 checkpoint and face model as for protection.\n"
    "Settings that matter: steps come from the key; guidance_scale 0 gives plain DDIM (no face model needed).")


def difp_protect():
    g = Graph("difp-protect",
              "DIFP protection (identity + style dual CFG with realism control, Entropy 2024) of the face in a photo, "
              "with a synthetic donor identity; protected images saved without metadata and the DIFP key saved (sealed "
              "once you type a password).", note=PROTECT_NOTE)
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    photo = g.node("LoadImage", title="photo to protect", image="face.png")
    face_model = add_arcface(g)
    identity = add_faceid_adapter(g, title="identity adapter")
    style = g.node("DiffPrivacyIdentityAdapterLoader", title="style adapter", adapter_name=STYLE, lora_name="auto",
                   lora_strength=1.0)
    vision = g.node("CLIPVisionLoader", clip_name=VIT_H)
    style_image = g.node("LoadImage", title="style image (any style; not the person)", image=STYLE_IMAGE)
    g.stage("Protect")
    protect = g.node("DiffPrivacyDIFPProtect", model=ckpt.out(0), clip=ckpt.out(1), vae=ckpt.out(2),
                     face_model=face_model.out(0), image=photo.out(0), identity_adapter=identity.out(0),
                     style_adapter=style.out(0), clip_vision=vision.out(0), style_image=style_image.out(0),
                     donor="synthetic", strength=0.8, steps=50, s_id=1.0, s_sty=1.0, style_source="another image",
                     realism="fixed", g_rea=0.6, realism_reference="original", region="face (feathered mask)",
                     num_outputs=2, seed=0, resolution=512)
    g.stage("Save images and key")
    g.node("DiffPrivacySaveImageClean", images=protect.out(0), filename_prefix="diffprivacy/difp-protected")
    g.node("DiffPrivacySaveDIFPKey", key=protect.out(1), protected=protect.out(0),
           filename_prefix="diffprivacy/difp-key", password="")
    return g


def difp_recover():
    g = Graph("difp-recover",
              "DIFP recovery from a DIFP key file (+ password) and the protected photo: DDIM from F_i with the "
              "identity correction of Eq. 17, the recovered face pasted back into the photo, saved without metadata.",
              note=RECOVER_NOTE)
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    key = g.node("DiffPrivacyLoadDIFPKey", key_file="", password="")
    protected = g.node("LoadImage", title="the protected photo", image="protected.png")
    face_model = add_arcface(g)
    g.stage("Recover and save")
    rec = g.node("DiffPrivacyDIFPRecover", model=ckpt.out(0), vae=ckpt.out(2), key=key.out(0), steps=key.out(1),
                 guidance_scale=1.0, face_model=face_model.out(0), protected=protected.out(0))
    g.node("DiffPrivacySaveImageClean", images=rec.out(0), filename_prefix="diffprivacy/difp-recovered")
    return g


def workflows():
    return [difp_protect(), difp_recover()]
