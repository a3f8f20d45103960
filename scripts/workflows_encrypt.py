"""Workflows of Stage II/III: anonymize, hide, recover, and anonymize with a text Key-E (nothing learnt).

anonymize / hide load a Key-E file written by the learn-key-e workflow; each protects one face photo,
saves the protected images without metadata, makes Key-I and seals Key-I + Key-E into one key file.
anonymize-fast is anonymize-text-key with the fast gradient preset (tiny decoder on the face window, issue 17).
anonymize-learn-key-e / hide-learn-key-e learn Key-E of the photo first, in the same run.
recover reads the key file of any of them and recovers the original. The step count S, the noise strength S_ns, tau
and the working resolution are one shared widget each (Int / Float primitives), since protection, Key-I
and the key file must agree on them. Settings are the paper's for a real SD 1.5 (tests shrink them in the API prompt).
"""
from workflow_builder import Graph
from workflows_key_e import LOAD, add_learn_key_e

SD15 = "v1-5-pruned-emaonly.safetensors"
# Key files are chosen by the user (a fresh install has none): the learn-key-e workflow writes Key-E files and
# anonymize / hide write key files under output/diffprivacy/; the notes say to pick one (R refreshes the list).
KEY_E_FILE = ""
KEY_FILE = ""
FACE = {"detector": "auto", "recognizer": "auto"}  # the best the machine has; the node says which
KEY_E, SETTINGS, PROTECT, KEEP = "Key-E", "Settings (shared)", "Protect", "Keep the key safe"  # stage titles
PHOTO = "your photo in Load Image (upload it, or put it in ComfyUI's input/ folder as face.png)"


def _settings(g, steps, strength, tau):
    g.stage(SETTINGS)
    return (g.node("PrimitiveInt", title="S: DDIM steps (protection, Key-I, key file)", value=steps),
            g.node("PrimitiveFloat", title="S_ns: noise strength", value=strength),
            g.node("PrimitiveFloat", title="tau: UC where t <= tau*T", value=tau),
            g.node("PrimitiveInt", title="working resolution (0: the photo's size)", value=512))


def _protect(g, ckpt, image, key_e, uncond, task, prefix, steps, strength, tau, settings=None, face=None,
             **task_settings):
    """The task node, its clean saver, Key-I and the key file, all on the shared S / S_ns / tau
    (``settings``: those primitives, when the caller made them already; ``face``: the face model loader, likewise)."""
    s, ns, t, res = settings or _settings(g, steps, strength, tau)
    g.stage(PROTECT)
    face = face or g.node("DiffPrivacyFaceModelLoader", **FACE)
    node = g.node(task, model=ckpt.out(0), vae=ckpt.out(2), face_model=face.out(0), image=image.out(0),
                  key_e=key_e, uncond=uncond, seed=0, steps=s.out(0), strength=ns.out(0), tau=t.out(0),
                  resolution=res.out(0), **task_settings)
    g.node("DiffPrivacySaveImageClean", images=node.out(0), filename_prefix=f"diffprivacy/{prefix}")
    g.stage(KEEP)
    # Key-I from the face crops the task protected, with their Key-Es (outputs 5 and 6) and where it cut them
    # (output 8): a photo the task left out (no face) gets no key, and the key records its crops so that Recover
    # pastes the recovered faces back into the protected photo.
    key_i = g.node("DiffPrivacyMakeKeyI", model=ckpt.out(0), key_e=node.out(6), vae=ckpt.out(2), image=node.out(5),
                   steps=s.out(0), resolution=res.out(0), crops=node.out(8))
    g.node("DiffPrivacySaveKey", key_i=key_i.out(0), key_e=node.out(6), model=ckpt.out(0), clip=ckpt.out(1),
           steps=s.out(0), tau=t.out(0), strength=ns.out(0), filename_prefix="diffprivacy/key", password="",
           protected=node.out(0))  # written only once protection has succeeded
    return node


def _with_key_e_file(name, task, prefix, steps, strength, tau, description, note, **task_settings):
    g = Graph(name, description, note)
    g.stage(LOAD)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    g.stage(KEY_E)
    key_e = g.node("DiffPrivacyLoadKeyE", key_file=KEY_E_FILE, password="", model=ckpt.out(0), clip=ckpt.out(1))
    uncond = g.node("CLIPTextEncode", title="UC (empty prompt)", clip=ckpt.out(1), text="")
    _protect(g, ckpt, image, key_e.out(0), uncond.out(0), task, prefix, steps, strength, tau, **task_settings)
    return g


def _learning_key_e(name, task, prefix, steps, strength, tau, description, note, **task_settings):
    """Learn Key-E of the photo's largest face crop (paper defaults, at the shared working resolution: what protection
    and Key-I see), then protect every face with it."""
    g = Graph(name, description, note)
    g.stage(LOAD)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    face = g.node("DiffPrivacyFaceModelLoader", **FACE)
    settings = _settings(g, steps, strength, tau)  # the resolution is also Key-E learning's
    g.stage(KEY_E)
    crops = g.node("DiffPrivacyFaceCrops", face_model=face.out(0), image=image.out(0), resolution=settings[3].out(0))
    learn = add_learn_key_e(g, ckpt, crops, resolution=settings[3].out(0), filename_prefix="diffprivacy/key_e")
    _protect(g, ckpt, image, learn.out(0), learn.out(1), task, prefix, steps, strength, tau, settings=settings,
             face=face, **task_settings)
    return g


def _anonymize_with_text_key(g, key_stage, prefix, gradient=None):
    """anonymize with a text Key-E at the paper's settings (50 steps, 0.6 T, tau 0.4, 4 outputs); ``gradient``:
    the Gradient Options node's widgets, when the workflow sets them."""
    g.stage(LOAD)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    g.stage(key_stage)
    key_e = g.node("DiffPrivacyTextKeyE", clip=ckpt.out(1), stage_text="a photo of a person")
    extra = {}
    if gradient is not None:
        extra["gradient_options"] = g.node("DiffPrivacyGradientOptions", **gradient).out(0)
    _protect(g, ckpt, image, key_e.out(0), key_e.out(1), "DiffPrivacyAnonymize", prefix, 50, 0.6, 0.4,
             num_outputs=4, guidance_scale=1.0, diversity_weight=1.0, **extra)


def workflows():
    anonymize = _with_key_e_file(
        "anonymize", "DiffPrivacyAnonymize", "anonymized", 50, 0.6, 0.4,
        "Diff-Privacy anonymization of face.png with its learnt Key-E (run learn-key-e first, then pick its "
        "file in Load Key-E). Paper defaults: 50 DDIM steps, noising to 0.6 T, tau 0.4, lambda 1, L_Idis + L_div, "
        "4 outputs, saved without metadata. Also makes Key-I and seals Key-I + Key-E into "
        "output/diffprivacy/key_*.safetensors (set a password on Save Key) for the recover workflow.",
        "What: anonymizes the face in your photo with its learnt Key-E (four new identities, paper 2.3.3), saves them "
        "without metadata, and seals Key-I + Key-E into one key file for the recover workflow.\n"
        f"Where: SD 1.5 checkpoint in Load Checkpoint; {PHOTO}; in Load Key-E pick the file learn-key-e wrote "
        "(R refreshes the list). Face Model Loader (auto) picks the face models installed.\n"
        "Settings that matter: S, S_ns, tau and the working resolution in Settings (shared by protection, Key-I and "
        "the key), guidance_scale on Anonymize, and a password on Save Key to seal the key.",
        num_outputs=4, guidance_scale=1.0, diversity_weight=1.0)
    hide = _with_key_e_file(
        "hide", "DiffPrivacyHide", "hidden", 100, 0.8, 0.6,
        "Diff-Privacy visual identity hiding of face.png with its learnt Key-E (run learn-key-e first). Reference "
        "defaults: 100 DDIM steps, noising to 0.8 T, tau 0.6, lambda 1.5 above tau and 2.5 below, L_is; saved "
        "without metadata. Also makes Key-I and seals Key-I + Key-E into output/diffprivacy/key_*.safetensors.",
        "What: hides the identity in your photo from people while face recognizers still match it (visual identity "
        "hiding, paper 2.3.4), saves it without metadata, and seals Key-I + Key-E into one key file.\n"
        f"Where: SD 1.5 checkpoint in Load Checkpoint; {PHOTO}; in Load Key-E pick the file learn-key-e wrote "
        "(R refreshes the list). Face Model Loader (auto) picks the face models installed.\n"
        "Settings that matter: S, S_ns, tau and the working resolution in Settings, lambda above / below tau on "
        "Hide, and a password on Save Key to seal the key.",
        num_outputs=1, lambda_above=1.5, lambda_below=2.5, redetect_every=10)

    recover = Graph("recover", "Diff-Privacy identity recovery from a key file (Key-I + Key-E of each protected face "
                               "crop, written by anonymize / hide) and the protected photo: the recovered faces are "
                               "pasted back where they were cut, the rest of the photo stays as the protected photo "
                               "has it (the key holds nothing of the photo outside the faces). Enter the key file's "
                               "password; the recovered photo is saved without metadata.",
                    "What: brings the original faces back into the protected photo from a key file (Key-I + Key-E, "
                    "Diff-Privacy Stage III), at the photo's own size; never needs the original.\n"
                    "Where: the SD 1.5 checkpoint the key was made with in Load Checkpoint; in Load Key pick the key "
                    "file anonymize or hide wrote (R refreshes the list) and type its password; the protected photo "
                    "in Load Image (protected.png in ComfyUI's input/ folder).\n"
                    "Settings that matter: none to tune: steps, tau, strength and the crops come from the key file. "
                    "The result is saved without metadata.")
    recover.stage("Load the key")
    ckpt = recover.node("CheckpointLoaderSimple", ckpt_name=SD15)
    key = recover.node("DiffPrivacyLoadKey", key_file=KEY_FILE, password="", model=ckpt.out(0), clip=ckpt.out(1))
    protected = recover.node("LoadImage", title="the protected photo", image="protected.png")
    recover.stage("Recover and save")
    rec = recover.node("DiffPrivacyRecover", model=ckpt.out(0), key_e=key.out(1), key_i=key.out(0), steps=key.out(2),
                       vae=ckpt.out(2), protected=protected.out(0))
    recover.node("DiffPrivacySaveImageClean", images=rec.out(1), filename_prefix="diffprivacy/recovered")

    text = Graph("anonymize-text-key",
                 "Diff-Privacy anonymization with a text prompt standing in for Key-E (nothing learnt, no CLIP "
                 "vision needed): same settings as anonymize (50 steps, 0.6 T, tau 0.4, 4 outputs saved without "
                 "metadata), and the same key file for the recover workflow. Anyone who guesses the prompt holds "
                 "the Key-E half of this key.",
                 "What: anonymization with a text prompt as Key-E (nothing learnt, no CLIP vision): the quickest way "
                 "to try the method; its key file works with the recover workflow.\n"
                 f"Where: SD 1.5 checkpoint in Load Checkpoint; {PHOTO}. Face Model Loader (auto) picks the "
                 "face models installed.\n"
                 "Settings that matter: the prompt on Text Key-E (whoever guesses it holds the Key-E half of the key), "
                 "S, S_ns, tau and the working resolution in Settings, and a password on Save Key.")
    _anonymize_with_text_key(text, "Key-E (text)", "anonymized-text-key")
    fast = Graph("anonymize-fast",
                 "anonymize-text-key's protection with the fast gradient preset: the identity gradient runs through "
                 "ComfyUI's tiny preview decoder (models/vae_approx/taesd_decoder.*) on the face's window only, in "
                 "chunks that fit the free memory; the saved images are still decoded with the full VAE. Same settings "
                 "otherwise (50 steps, 0.6 T, tau 0.4, 4 outputs) and the same key file for the recover workflow.",
                 "What: anonymization tuned for speed while you try settings: the guidance gradient goes through the "
                 "tiny preview decoder on the face's window instead of the full VAE on the whole frame (the outputs "
                 "are still decoded by the full VAE).\n"
                 f"Where: SD 1.5 checkpoint in Load Checkpoint; {PHOTO}; taesd_decoder.safetensors (or .pth) in "
                 "models/vae_approx/ (the file ComfyUI's previews use; without it the run stops and names the file, or "
                 "set gradient_decoder to auto to fall back to the full VAE).\n"
                 "Settings that matter: Gradient Options (decoder, face window, chunk), S, S_ns, tau and the working "
                 "resolution in Settings, the prompt on Text Key-E, and a password on Save Key.")
    _anonymize_with_text_key(fast, "Key-E (text) and the fast gradient", "anonymized-fast",
                             gradient=dict(gradient_chunk=0, gradient_decoder="tiny", face_window=True))
    learn_first = ("Learns Key-E of face.png first (Stage I, the authors' defaults: 6100 steps, which takes a while; "
                   "the Key-E file lands in output/diffprivacy/key_e_*.safetensors, set a password on Learn Key-E to "
                   "seal it), then ")
    anonymize_learn = _learning_key_e(
        "anonymize-learn-key-e", "DiffPrivacyAnonymize", "anonymized", 50, 0.6, 0.4,
        learn_first + "anonymizes face.png with it as the anonymize workflow does (50 DDIM steps, noising to 0.6 T, "
        "tau 0.4, lambda 1, L_Idis + L_div, 4 outputs saved without metadata) and seals Key-I + Key-E into "
        "output/diffprivacy/key_*.safetensors (set a password on Save Key) for the recover workflow.",
        "What: one run from photo to protection: learns Key-E of your photo (Stage I), anonymizes it (four new "
        "identities) without metadata, and seals Key-I + Key-E into one key file for the recover workflow.\n"
        f"Where: SD 1.5 checkpoint in Load Checkpoint, CLIP-vision ViT-L/14 in Load CLIP Vision, {PHOTO}.\n"
        "Settings that matter: steps on Learn Key-E (6100 takes long on a CPU), S, S_ns, tau and the working "
        "resolution in Settings (shared by learning, protection and Key-I), passwords on Learn Key-E and Save Key.",
        num_outputs=4, guidance_scale=1.0, diversity_weight=1.0)
    hide_learn = _learning_key_e(
        "hide-learn-key-e", "DiffPrivacyHide", "hidden", 100, 0.8, 0.6,
        learn_first + "hides the identity in face.png with it as the hide workflow does (100 DDIM steps, noising to "
        "0.8 T, tau 0.6, lambda 1.5 above tau and 2.5 below, L_is; saved without metadata) and seals Key-I + Key-E "
        "into output/diffprivacy/key_*.safetensors for the recover workflow.",
        "What: one run from photo to protection: learns Key-E of your photo (Stage I), hides the identity from "
        "people (machines still match it), saves it without metadata and seals Key-I + Key-E into one key file.\n"
        f"Where: SD 1.5 checkpoint in Load Checkpoint, CLIP-vision ViT-L/14 in Load CLIP Vision, {PHOTO}.\n"
        "Settings that matter: steps on Learn Key-E (6100 takes long on a CPU), S, S_ns, tau and the working "
        "resolution in Settings, lambda above / below tau on Hide, passwords on Learn Key-E and Save Key.",
        num_outputs=1, lambda_above=1.5, lambda_below=2.5, redetect_every=10)
    return [anonymize, hide, recover, text, fast, anonymize_learn, hide_learn]
