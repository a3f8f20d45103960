"""Workflows of the papers' evaluation protocols.

- key-security (paper A.3.1, Fig. 7): the original recovered from a key file four ways (the correct Key-I and
  Key-E; a wrong Key-I, from another photo; a wrong Key-E, a guessed prompt; UC as Key-E), compared with the
  original by DiffPrivacyKeySecurity (figure and table).
- evaluate-baselines: blur, pixelation and mosaic of a face photo, each measured with the protection success
  rate (dlib, a recognizer no guidance ever sees) and the image quality metrics.
"""
from workflow_builder import Graph
from workflows_encrypt import KEY_FILE, PHOTO, SD15

OTHER_FACE = "other-face.png"  # any photo of someone else: its Key-I is the wrong Key-I


def key_security():
    g = Graph("key-security",
              "Diff-Privacy key security (paper Fig. 7): recovers the original from a key file (written by "
              "anonymize, hide or anonymize-text-key; enter its password) with the correct Key-I + Key-E, with a "
              "wrong Key-I (DDIM inversion of another person's photo: pick one in the second Load Image), with a "
              "wrong Key-E (a guessed prompt) and with UC (the empty prompt) as Key-E, and compares each with the "
              "original photo (PSNR, SSIM, MSE...): only the correct key should bring it back. Set the working "
              "resolution to the one the key was made at.",
              "What: paper Fig. 7: recovers the original from one key file four ways (correct key, wrong Key-I, "
              "wrong Key-E, UC as Key-E) and compares each with the photo; only the correct key brings it back.\n"
              "Where: SD 1.5 checkpoint in Load Checkpoint; the key's original photo and another person's photo in "
              "the two Load Image nodes (upload them, or put face.png and other-face.png in ComfyUI's input/ folder); "
              "in Load Key pick a key file from anonymize or hide (R refreshes the list) and type its password.\n"
              "Settings that matter: the working resolution must be the one the key was made at (512 by default).")
    g.stage("Load")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    original = g.node("LoadImage", title="the original photo (the key's)", image="face.png")
    other = g.node("LoadImage", title="another person's photo (makes the wrong Key-I)", image=OTHER_FACE)
    key = g.node("DiffPrivacyLoadKey", key_file=KEY_FILE, password="", model=ckpt.out(0), clip=ckpt.out(1))
    resolution = g.node("PrimitiveInt", title="working resolution the key was made at (0: the photo's size)",
                        value=512)
    g.stage("Wrong keys")
    wrong_key_i = g.node("DiffPrivacyMakeKeyI", title="wrong Key-I (another photo, the same Key-E)",
                         model=ckpt.out(0), key_e=key.out(1), vae=ckpt.out(2), image=other.out(0), steps=key.out(2),
                         resolution=resolution.out(0))
    wrong_key_e = g.node("DiffPrivacyTextKeyE", title="wrong Key-E (a guessed prompt)", clip=ckpt.out(1),
                         stage_text="a photo of a face")
    uc = g.node("CLIPTextEncode", title="UC (empty prompt) as Key-E", clip=ckpt.out(1), text="")
    variants = {"correct_key": (key.out(0), key.out(1)), "wrong_key_i": (wrong_key_i.out(0), key.out(1)),
                "wrong_key_e": (key.out(0), wrong_key_e.out(0)), "uc_as_key_e": (key.out(0), uc.out(0))}
    decoded = {}
    g.stage("Recover four ways")
    for name, (key_i, key_e) in variants.items():
        rec = g.node("DiffPrivacyRecover", title=f"recover: {name.replace('_', ' ')}", model=ckpt.out(0),
                     key_e=key_e, key_i=key_i, steps=key.out(2))
        decoded[name] = g.node("VAEDecode", samples=rec.out(0), vae=ckpt.out(2)).out(0)
    g.stage("Compare")
    security = g.node("DiffPrivacyKeySecurity", original=original.out(0), **decoded)
    g.node("PreviewImage", title="key security figure and table", images=security.out(0))
    g.node("PreviewAny", title="key security table (JSON)", source=security.out(1))
    return g


def evaluate_baselines():
    g = Graph("evaluate-baselines",
              "The classic baselines (paper Fig. 3) on face.png: Gaussian blur, pixelation and mosaic of the detected "
              "face (strong settings), each measured with the protection success rate (dlib's recognizer, which no "
              "guidance sees: 1 = no longer matched to the original) and the image quality metrics against the "
              "original (PSNR, SSIM, MSE...). Results are shown as JSON on the Preview as Text nodes.",
              "What: the classic baselines (paper Fig. 3) on your photo: Gaussian blur, pixelation and mosaic of the "
              "detected face, each scored by the protection success rate (dlib) and the image quality.\n"
              f"Where: {PHOTO}. No checkpoint is needed; dlib's models come with requirements.txt.\n"
              "Settings that matter: sigma_percent, blocks and tile_percent on the three baseline nodes (stronger "
              "hides more and costs quality); 1 in a protection rate means no longer matched to the original.")
    g.stage("Load")
    image = g.node("LoadImage", image="face.png")
    dlib = g.node("DiffPrivacyDlibFaceModel")
    baselines = {"blur": ("DiffPrivacyBlurFaces", {"sigma_percent": 10.0}),
                 "pixelate": ("DiffPrivacyPixelateFaces", {"blocks": 6}),
                 "mosaic": ("DiffPrivacyMosaicFaces", {"tile_percent": 16.0})}
    for name, (node_type, strength) in baselines.items():
        g.stage("Cover the face")
        covered = g.node(node_type, face_model=dlib.out(0), image=image.out(0), **strength)
        g.node("PreviewImage", title=f"{name}: image", images=covered.out(0))
        g.stage("Measure")
        rate = g.node("DiffPrivacyProtectionRate", face_model=dlib.out(0), original=image.out(0),
                      protected=covered.out(0))
        g.node("PreviewAny", title=f"{name}: protection success rate (JSON)", source=rate.out(1))
        quality = g.node("DiffPrivacyImageQuality", original=image.out(0), other=covered.out(0))
        g.node("PreviewAny", title=f"{name}: image quality (JSON)", source=quality.out(3))
    return g


def workflows():
    return [key_security(), evaluate_baselines()]
