"""Workflows of Stage II/III: anonymize, hide, recover, and anonymize with a text Key-E (nothing learnt).

anonymize / hide load a Key-E file written by the learn-key-e workflow; each protects one face photo,
saves the protected images without metadata, makes Key-I and seals Key-I + Key-E into one key file.
anonymize-learn-key-e / hide-learn-key-e learn Key-E of the photo first, in the same run.
recover reads the key file of any of them and recovers the original. The step count S, the noise strength S_ns, tau
and the working resolution are one shared widget each (Int / Float primitives), since protection, Key-I
and the key file must agree on them. Settings are the paper's for a real SD 1.5 (tests shrink them in the API prompt).
"""
from workflow_builder import Graph
from workflows_key_e import add_learn_key_e

SD15 = "v1-5-pruned-emaonly.safetensors"
KEY_E_FILE = "key_e_00001_.safetensors"  # under output/diffprivacy/, written by the learn-key-e workflow
KEY_FILE = "key_00001_.safetensors"      # under output/diffprivacy/, written by anonymize / hide below
FACE = {"detector": "mtcnn", "recognizer": "facenet-casia"}


def _settings(g, steps, strength, tau, resolution_for="protection, Key-I"):
    return (g.node("PrimitiveInt", title="S: DDIM steps (protection, Key-I, key file)", value=steps),
            g.node("PrimitiveFloat", title="S_ns: noise strength", value=strength),
            g.node("PrimitiveFloat", title="tau: UC where t <= tau*T", value=tau),
            g.node("PrimitiveInt", title=f"working resolution ({resolution_for}; 0: the photo's size)", value=512))


def _protect(g, ckpt, image, key_e, uncond, task, prefix, steps, strength, tau, settings=None, **task_settings):
    """The task node, its clean saver, Key-I and the key file, all on the shared S / S_ns / tau
    (``settings``: those primitives, when the caller made them already)."""
    s, ns, t, res = settings or _settings(g, steps, strength, tau)
    face = g.node("DiffPrivacyFaceModelLoader", **FACE)
    node = g.node(task, model=ckpt.out(0), vae=ckpt.out(2), face_model=face.out(0), image=image.out(0),
                  key_e=key_e, uncond=uncond, seed=0, steps=s.out(0), strength=ns.out(0), tau=t.out(0),
                  resolution=res.out(0), **task_settings)
    g.node("DiffPrivacySaveImageClean", images=node.out(0), filename_prefix=f"diffprivacy/{prefix}")
    key_i = g.node("DiffPrivacyMakeKeyI", model=ckpt.out(0), key_e=key_e, vae=ckpt.out(2), image=image.out(0),
                   steps=s.out(0), resolution=res.out(0))
    g.node("DiffPrivacySaveKey", key_i=key_i.out(0), key_e=key_e, model=ckpt.out(0), clip=ckpt.out(1),
           steps=s.out(0), tau=t.out(0), strength=ns.out(0), filename_prefix="diffprivacy/key", password="",
           protected=node.out(0))  # written only once protection has succeeded
    return node


def _with_key_e_file(name, task, prefix, steps, strength, tau, description, **task_settings):
    g = Graph(name, description)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    key_e = g.node("DiffPrivacyLoadKeyE", key_file=KEY_E_FILE, password="", model=ckpt.out(0), clip=ckpt.out(1))
    uncond = g.node("CLIPTextEncode", title="UC (empty prompt)", clip=ckpt.out(1), text="")
    _protect(g, ckpt, image, key_e.out(0), uncond.out(0), task, prefix, steps, strength, tau, **task_settings)
    return g


def _learning_key_e(name, task, prefix, steps, strength, tau, description, **task_settings):
    """Learn Key-E of the photo (paper defaults, at the shared working resolution), then protect with it."""
    g = Graph(name, description)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = g.node("LoadImage", image="face.png")
    settings = _settings(g, steps, strength, tau, resolution_for="Key-E learning, protection, Key-I")
    learn = add_learn_key_e(g, ckpt, image, resolution=settings[3].out(0), filename_prefix="diffprivacy/key_e")
    _protect(g, ckpt, image, learn.out(0), learn.out(1), task, prefix, steps, strength, tau, settings=settings,
             **task_settings)
    return g


def workflows():
    anonymize = _with_key_e_file(
        "anonymize", "DiffPrivacyAnonymize", "anonymized", 50, 0.6, 0.4,
        "Diff-Privacy anonymization of face.png with its learnt Key-E (run learn-key-e first, then pick its "
        "file in Load Key-E). Paper defaults: 50 DDIM steps, noising to 0.6 T, tau 0.4, lambda 1, L_Idis + L_div, "
        "4 outputs, saved without metadata. Also makes Key-I and seals Key-I + Key-E into "
        "output/diffprivacy/key_*.safetensors (set a password on Save Key) for the recover workflow.",
        num_outputs=4, guidance_scale=1.0, diversity_weight=1.0)
    hide = _with_key_e_file(
        "hide", "DiffPrivacyHide", "hidden", 100, 0.8, 0.6,
        "Diff-Privacy visual identity hiding of face.png with its learnt Key-E (run learn-key-e first). Reference "
        "defaults: 100 DDIM steps, noising to 0.8 T, tau 0.6, lambda 1.5 above tau and 2.5 below, L_is; saved "
        "without metadata. Also makes Key-I and seals Key-I + Key-E into output/diffprivacy/key_*.safetensors.",
        num_outputs=1, lambda_above=1.5, lambda_below=2.5, redetect_every=10)

    recover = Graph("recover", "Diff-Privacy identity recovery from a key file (Key-I + Key-E, written by "
                               "anonymize / hide): needs neither the protected nor the original image. Enter the "
                               "key file's password; the recovered image is saved without metadata.")
    ckpt = recover.node("CheckpointLoaderSimple", ckpt_name=SD15)
    key = recover.node("DiffPrivacyLoadKey", key_file=KEY_FILE, password="", model=ckpt.out(0), clip=ckpt.out(1))
    rec = recover.node("DiffPrivacyRecover", model=ckpt.out(0), key_e=key.out(1), key_i=key.out(0), steps=key.out(2))
    decoded = recover.node("VAEDecode", samples=rec.out(0), vae=ckpt.out(2))
    recover.node("DiffPrivacySaveImageClean", images=decoded.out(0), filename_prefix="diffprivacy/recovered")

    text = Graph("anonymize-text-key",
                 "Diff-Privacy anonymization with a text prompt standing in for Key-E (nothing learnt, no CLIP "
                 "vision needed): same settings as anonymize (50 steps, 0.6 T, tau 0.4, 4 outputs saved without "
                 "metadata), and the same key file for the recover workflow. Anyone who guesses the prompt holds "
                 "the Key-E half of this key.")
    ckpt = text.node("CheckpointLoaderSimple", ckpt_name=SD15)
    image = text.node("LoadImage", image="face.png")
    key_e = text.node("DiffPrivacyTextKeyE", clip=ckpt.out(1), stage_text="a photo of a person")
    _protect(text, ckpt, image, key_e.out(0), key_e.out(1), "DiffPrivacyAnonymize", "anonymized-text-key",
             50, 0.6, 0.4, num_outputs=4, guidance_scale=1.0, diversity_weight=1.0)
    learn_first = ("Learns Key-E of face.png first (Stage I, the authors' defaults: 6100 steps, which takes a while; "
                   "the Key-E file lands in output/diffprivacy/key_e_*.safetensors, set a password on Learn Key-E to "
                   "seal it), then ")
    anonymize_learn = _learning_key_e(
        "anonymize-learn-key-e", "DiffPrivacyAnonymize", "anonymized", 50, 0.6, 0.4,
        learn_first + "anonymizes face.png with it as the anonymize workflow does (50 DDIM steps, noising to 0.6 T, "
        "tau 0.4, lambda 1, L_Idis + L_div, 4 outputs saved without metadata) and seals Key-I + Key-E into "
        "output/diffprivacy/key_*.safetensors (set a password on Save Key) for the recover workflow.",
        num_outputs=4, guidance_scale=1.0, diversity_weight=1.0)
    hide_learn = _learning_key_e(
        "hide-learn-key-e", "DiffPrivacyHide", "hidden", 100, 0.8, 0.6,
        learn_first + "hides the identity in face.png with it as the hide workflow does (100 DDIM steps, noising to "
        "0.8 T, tau 0.6, lambda 1.5 above tau and 2.5 below, L_is; saved without metadata) and seals Key-I + Key-E "
        "into output/diffprivacy/key_*.safetensors for the recover workflow.",
        num_outputs=1, lambda_above=1.5, lambda_below=2.5, redetect_every=10)
    return [anonymize, hide, recover, text, anonymize_learn, hide_learn]
