"""DIFP (You et al., Entropy 2024) as ComfyUI nodes: thin adapters of ``methods.difp``, ``guidance.ilvr``,
``methods.difp_keys`` and ``methods.difp_training``.

DIFP_KEY: an ``methods.difp_keys.DIFPKey`` (F_i as a Key-I LATENT with provenance, F_e = text condition, the
original's identity embedding and landmarks).
"""
from __future__ import annotations

import logging


from ..methods import difp
from ..guidance.ilvr import MODES, SPACES, RealismControl
from ..guidance.guided_ddim import guided_ddim_sampler
from ..guidance.identity_streams import streams_on
from ..methods import difp_keys
from ..methods import difp_training
from ..methods import contract
from ..methods.pipeline import paste_recovered
from ..methods.receipt import receipt_text
from .common import (CATEGORY, KEY_SUBFOLDER, KEY_SUFFIX, PASSWORD_WARNING, StepProgress, key_file_name,
                     list_key_files, pipeline_input, receipt_outputs, resolution_input, key_file_digest,
                     resolve_key_path, rgb_batch, tip, write_new_output_file)

log = logging.getLogger("diffprivacy")
DIFP_CATEGORY = f"{CATEGORY}/DIFP"
REALISM = ("fixed", "adaptive (Eq. 14 as printed)", "off")
REGIONS = ("face (feathered mask)", "whole frame")

G_REA_TIP = ("g_rea, the realism scale of Eq. 13: H = -g_rea (M - 1) + (M + k) is the low-pass size on an M-wide "
             "latent. 0 copies the reference's low frequencies (H = M), 1 leaves the sample free (H = 1 + k). Paper: "
             "0.6 (best 0.5-0.7).")
MODE_TIP = ("fixed: g_rea as set. adaptive: g_rea = SSIM(sample, noised reference) each step (Eq. 14 as printed). "
            "The paper's text says higher similarity drives g_rea to 0, which contradicts its own formula; the "
            "formula is followed (similar -> g_rea near 1 -> weaker constraint).")
K_TIP = "k of Eq. 13: the paper does not report it (0 here). H = 1 + k at g_rea = 1."
STOP_TIP = "Fraction of the DDIM steps that get realism control (the first ones); later steps run free. 1: every step."
SPACE_TIP = ("latent: low-pass on the SD latent (fast, default). pixel: decode, low-pass the image, encode (slower, "
             "approximate; the paper filters images).")


def _realism_mode(value: str) -> tuple[bool, str]:
    return value != "off", "adaptive" if value.startswith("adaptive") else "fixed"


def _optional_image(image, name: str):
    return None if image is None else rgb_batch(image, name)


class DiffPrivacyDIFPGuider:
    DESCRIPTION = ("DIFP's dual classifier-free guidance (Eq. 10) as a GUIDER for SamplerCustomAdvanced: eps = "
                   "eps(∅,∅) + s_id [eps(id,∅) - eps(∅,∅)] + s_sty [eps(∅,sty) - eps(∅,∅)], the three entries in one "
                   "batched UNet call per step. The model must carry identity/style streams (Apply Identity Streams); "
                   "∅ is a stream switched off (its zero-embedding tokens).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("Your SD 1.5 model with identity and/or style streams (Apply Identity Streams).")),
            "conditioning": ("CONDITIONING", tip("The text condition shared by the three entries (DIFP uses none: "
                                                 "encode an empty prompt).")),
            "s_id": ("FLOAT", tip("Identity guidance scale s_id (not reported by the paper).", default=1.0,
                                  min=-10.0, max=30.0, step=0.05)),
            "s_sty": ("FLOAT", tip("Style guidance scale s_sty (not reported by the paper).", default=1.0,
                                   min=-10.0, max=30.0, step=0.05)),
        }}

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A GUIDER for SamplerCustomAdvanced (any sampler).",)
    FUNCTION = "guider"
    CATEGORY = DIFP_CATEGORY

    def guider(self, model, conditioning, s_id, s_sty):
        notes = []
        if s_id == 0.0 and s_sty == 0.0:
            notes.append("s_id = s_sty = 0: plain sampling of the unconditional entry")
        have = streams_on(model)
        unused = [(stream, scale, value) for stream, scale, value in (("identity", "s_id", s_id),
                                                                      ("style", "s_sty", s_sty))
                  if value != 0.0 and stream not in have]
        if unused and not have:
            raise ValueError(f"this MODEL carries no identity or style streams, so DIFP guidance with "
                             f"{' and '.join(f'{scale} = {value:g}' for _, scale, value in unused)} would be plain "
                             "unconditional sampling: connect the MODEL output of Apply Identity Streams (with a "
                             "FaceID adapter and a face embedding, and/or a style adapter and image) to this guider")
        for stream, scale, value in unused:  # the other stream is there: leaving this scale at its default is likely
            notes.append(f"the MODEL carries no {stream} stream, so {scale} = {value:g} has no effect: add a {stream} "
                         f"adapter in Apply Identity Streams, or set {scale} to 0")
        for note in notes:
            log.warning("[Diff-Privacy] DIFP guider: %s", note)
        return {"ui": {"text": notes}, "result": (difp.difp_guider(model, conditioning, s_id, s_sty),)}


class DiffPrivacyRealismDDIMSampler:
    DESCRIPTION = ("The pack's deterministic DDIM with DIFP's realism control (ILVR, Eqs. 12-14) right after each "
                   "step: z <- z - LP_H(z) + LP_H(reference noised to the next level, fresh noise), LP_H an "
                   "antialiased resize to H x H and back. Use with SamplerCustom(Advanced) and DiffPrivacyDDIMSigmas.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("The model the sampler runs (its latent format).")),
            "vae": ("VAE", tip("Encodes the reference (and decodes/encodes in pixel space).")),
            "reference": ("IMAGE", tip("X_com, the reference whose low frequencies the sample keeps (DIFP: the "
                                       "original). At the sampled latent's size (encode the same image).")),
            "g_rea": ("FLOAT", tip(G_REA_TIP, default=0.6, min=0.0, max=1.0, step=0.01)),
            "mode": (MODES, tip(MODE_TIP, default="fixed")),
            "k": ("FLOAT", tip(K_TIP, default=0.0, min=-64.0, max=64.0, step=1.0)),
            "stop_at": ("FLOAT", tip(STOP_TIP, default=1.0, min=0.0, max=1.0, step=0.01)),
            "space": (SPACES, tip(SPACE_TIP, default="latent")),
            "seed": ("INT", tip("Seed of the fresh noise that noises the reference each step.", default=0, min=0,
                                max=0xFFFFFFFFFFFFFFFF)),
        }}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER (DDIM, eta 0, with realism control).",)
    FUNCTION = "sampler"
    CATEGORY = DIFP_CATEGORY

    def sampler(self, model, vae, reference, g_rea, mode, k, stop_at, space, seed):
        settings = difp.DIFPSettings(g_rea=g_rea, realism_mode=mode, realism_k=k, realism_stop_at=stop_at,
                                     realism_space=space, seed=seed)
        control = difp.realism_control(model, vae, vae.encode(rgb_batch(reference, "reference")[:1]), settings)
        assert isinstance(control, RealismControl)
        return (guided_ddim_sampler(None, realism=control),)


class DiffPrivacyDIFPProtect:
    DESCRIPTION = ("DIFP protection (Sec. 3.3): the face is regenerated from the original noised to S_n*T under a "
                   "donor identity and a style (dual CFG, Eq. 10, one batched UNet call per step), kept realistic by "
                   "low-pass realism control (ILVR, Eq. 12-14), and composited into the photo through a feathered "
                   "mask over the detected face. Also makes the key: F_i (DDIM inversion of the original to S_n*T) "
                   "and F_e (the text condition and the original's identity embedding) for DIFP Recover.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("Your SD 1.5 checkpoint's MODEL, without streams (they are added here; a MODEL from "
                                   "Apply Identity Streams is refused: its streams would mix in).")),
            "clip": ("CLIP", tip("Its text encoder: encodes the (empty) prompt DIFP conditions on.")),
            "vae": ("VAE", tip("Its VAE.")),
            "face_model": ("FACE_MODEL", tip("Detector + recognizer: finds the face (mask), embeds the original "
                                             "(key) and the donor. FaceID's space is arcface-r50 of buffalo_l.")),
            "image": ("IMAGE", tip("The photo to protect (one image).")),
            "donor": (difp.DONORS, tip("Where the identity comes from: synthetic (an identity embedding drawn far "
                                       "from the original by the recognizer's threshold: no donor photo needed), "
                                       "image (donor_image) or embedding (donor_embedding).", default="synthetic")),
            "strength": ("FLOAT", tip("S_n, the noise strength (Eq. 15): t = S_n*T. Paper best 0.8. Above 1 is "
                                      "refused: there is no timestep beyond T.", default=0.8, min=0.01, max=2.0,
                                      step=0.01)),
            "steps": ("INT", tip("DDIM steps over the whole schedule (int(S_n*steps) are run).", default=50, min=1,
                                 max=1000)),
            "s_id": ("FLOAT", tip("Identity guidance s_id (Eq. 10; not reported by the paper).", default=1.0,
                                  min=-10.0, max=30.0, step=0.05)),
            "s_sty": ("FLOAT", tip("Style guidance s_sty (Eq. 10; not reported by the paper). 0 with s_id 0: plain "
                                   "img2img, with a warning.", default=1.0, min=-10.0, max=30.0, step=0.05)),
            "style_source": (difp.SOURCES, tip(
                "Where the style image I_sty comes from (the paper: 'an image of any style'). original: the photo "
                "itself; its CLIP reading, identity cues included, guides every step at s_sty (costs privacy). "
                "another image: style_image (nothing of the original). none: no style stream (s_sty ignored).",
                default="none")),
            "realism": (REALISM, tip(MODE_TIP + " off: no realism control.", default="fixed")),
            "g_rea": ("FLOAT", tip(G_REA_TIP, default=0.6, min=0.0, max=1.0, step=0.01)),
            "realism_reference": (difp.SOURCES, tip(
                "Where the realism reference X_com comes from. original: the photo; its low frequencies (face shape, "
                "pose, skin tone, light; H = 26 of 64 latent cells per side at g_rea 0.6) are copied at every "
                "controlled step: the face fits the photo, and that coarse structure survives (costs privacy). "
                "another image: reference. none: no realism control.", default="original")),
            "region": (REGIONS, tip("face: only a feathered region around the largest detected face changes (the "
                                    "rest of the photo is the original's pixels). whole frame: everything is "
                                    "regenerated.", default=REGIONS[0])),
            "num_outputs": ("INT", tip("N protected images with independent seeds.", default=1, min=1, max=16)),
            "seed": ("INT", tip("Seed of the noising (and of the synthetic donor).", default=0, min=0,
                                max=0xFFFFFFFFFFFFFFFF)),
            "resolution": resolution_input("Protection and the key work on the face crop at this size; the "
                                           "protected photo keeps its own size."),
        }, "optional": {
            "identity_adapter": ("IDENTITY_ADAPTER", tip("The identity adapter (FaceID, or one trained by Train DIFP "
                                                         "Adapters); needed when s_id != 0.")),
            "style_adapter": ("IDENTITY_ADAPTER", tip("The style adapter (ip-adapter_sd15 / -plus, or DIFP-trained); "
                                                      "needed when s_sty != 0.")),
            "clip_vision": ("CLIP_VISION", tip("CLIP vision (ViT-H for the released adapters) reading the style "
                                               "image.")),
            "donor_image": ("IMAGE", tip("donor = image: a photo of the identity donor.")),
            "donor_embedding": ("FACE_EMBEDDING", tip("donor = embedding: from Face Embedding.")),
            "style_image": ("IMAGE", tip("style_source = another image: the style image (any style; not the "
                                         "person). Another size is resized (logged).")),
            "reference": ("IMAGE", tip("realism_reference = another image: X_com for realism control.")),
            "realism_k": ("FLOAT", tip(K_TIP, default=0.0, min=-64.0, max=64.0, step=1.0)),
            "realism_stop_at": ("FLOAT", tip(STOP_TIP, default=1.0, min=0.0, max=1.0, step=0.01)),
            "realism_space": (SPACES, tip(SPACE_TIP, default="latent")),
            "prompt": ("STRING", tip("Text condition (DIFP: empty). Stored in the key.", default="")),
            "pipeline": pipeline_input(" A DIFP key belongs to one face: one face at a time (unconnected: the "
                                       "largest)."),
        }}

    RETURN_TYPES = ("IMAGE", "DIFP_KEY", "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("protected", "key", "original", "mask", "receipt")
    OUTPUT_TOOLTIPS = ("The N protected photos at their own size (the face crop protected and pasted back).",
                       "The DIFP key (F_i + F_e of the face crop, and where it was cut): save it with Save DIFP Key.",
                       "The original photo.",
                       "Where the photo may have changed: the pipeline's pasted mask (0: the original's pixels; "
                       "within it DIFP's own face mask limits the change, and the crop's round trip through the "
                       "working resolution softens the rest).",
                       "The receipt (JSON): the face found or not, identity distance to the original under a "
                       "recognizer DIFP was not guided by (dlib by default), the verdict and the crop size, on the "
                       "delivered photo after 8-bit rounding.")
    FUNCTION = "protect"
    CATEGORY = DIFP_CATEGORY

    def protect(self, model, clip, vae, face_model, image, donor, strength, steps, s_id, s_sty, realism, g_rea,
                region, num_outputs, seed, resolution=512, identity_adapter=None, style_adapter=None, clip_vision=None,
                donor_image=None, donor_embedding=None, style_image=None, reference=None, realism_k=0.0,
                realism_stop_at=1.0, realism_space="latent", prompt="", style_source="none",
                realism_reference="original", pipeline=None):
        on, mode = _realism_mode(realism)
        settings = difp.DIFPSettings(steps=steps, strength=strength, s_id=s_id, s_sty=s_sty, g_rea=g_rea, realism=on,
                                     realism_mode=mode, realism_k=realism_k, realism_stop_at=realism_stop_at,
                                     realism_space=realism_space, seed=seed, num_outputs=num_outputs, donor=donor,
                                     style_source=style_source, reference_source=realism_reference,
                                     whole_frame=region == REGIONS[1], prompt=prompt,
                                     donor_image=_optional_image(donor_image, "donor_image"),
                                     donor_embedding=donor_embedding,
                                     style_image=_optional_image(style_image, "style_image"),
                                     reference=_optional_image(reference, "reference"))
        images = rgb_batch(image)
        if images.shape[0] != 1:
            raise ValueError(f"DIFP Protect protects one photo at a time (its key belongs to one face); got a batch "
                             f"of {images.shape[0]} images: split the batch and protect each photo with its own key")
        models = contract.Models(model=model, clip=clip, vae=vae, face_model=face_model, clip_vision=clip_vision,
                                 adapter=identity_adapter, extra={"style_adapter": style_adapter})
        delivery = contract.protect(images, difp.METHOD, models, settings, pipeline, resolution)
        (done,) = delivery.delivered
        (face,) = done.result.faces
        key = face.key
        key.face_crops = done.plan.as_dict()
        mask = done.plan.mask()  # the crop comes back resized: every pixel under the pasted mask may change a little
        report = face.report
        receipt, text = receipt_outputs(delivery.receipts, ["\n".join(
            [f"{report['outputs']} image(s) protected", f"style: {report['style']}",
             f"realism reference: {report['reference']}"] + report["warnings"])], receipt_text)
        return {"ui": {"text": text}, "result": (done.images, key, done.photo[None], mask[None], receipt)}


class DiffPrivacySaveDIFPKey:
    DESCRIPTION = ("Saves a DIFP key (F_i + F_e) in the pack's key-file format, sealed with the password if one is "
                   "given (AES-256-GCM, scrypt); its kind tag (inside the sealed part) makes Diff-Privacy's Load Key "
                   "refuse it. Never overwrites a file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key": ("DIFP_KEY", tip("The key from DIFP Protect.")),
            "filename_prefix": ("STRING", tip(f"Path and name prefix under the output folder ('{KEY_SUBFOLDER}/' is "
                                              "listed by Load DIFP Key); a counter is appended.",
                                              default=f"{KEY_SUBFOLDER}/difp-key")),
            "password": ("STRING", tip("Password sealing the key file; empty: unsealed (anyone with the file can "
                                       "recover the face). " + PASSWORD_WARNING, default="")),
        }, "optional": {
            "protected": ("IMAGE", tip("Connect the protected images so the key is written only after protection "
                                       "succeeded; nothing of them goes into the file.")),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("key_path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the key file written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = DIFP_CATEGORY

    def save(self, key, filename_prefix, password, protected=None):
        path, _ = write_new_output_file(filename_prefix, KEY_SUFFIX,
                                        lambda p: difp_keys.write_difp_key(p, key, password or None))
        note = "sealed with the password" if password else "NOT sealed: anyone with this file can use the key"
        return {"ui": {"text": [f"{key_file_name(path)} ({note})"]}, "result": (str(path),)}  # as Load DIFP Key lists


class DiffPrivacyLoadDIFPKey:
    DESCRIPTION = ("Loads a DIFP key file (F_i + F_e). Refuses a wrong password, a damaged file and a Diff-Privacy key "
                   "bundle (use Load Key (Diff-Privacy) for those).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "key_file": (list_key_files(), tip(f"A key file under output/{KEY_SUBFOLDER}/, named as Save DIFP Key "
                                               "shows it (press R in the canvas to list one saved since the page "
                                               "loaded). Ignored when key_path is given.")),
            "password": ("STRING", tip("Password of a sealed key file; empty for an unsealed one. " + PASSWORD_WARNING,
                                       default="")),
        }, "optional": {
            "key_path": ("STRING", tip("Path of the key file (in the output or input folder); overrides key_file.",
                                       default="")),
        }}

    RETURN_TYPES = ("DIFP_KEY", "INT")
    RETURN_NAMES = ("key", "steps")
    OUTPUT_TOOLTIPS = ("The DIFP key.", "The DDIM step count it was made with.")
    FUNCTION = "load"
    CATEGORY = DIFP_CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, key_file):
        return True  # checked when the node runs: the list is empty until a key is saved

    @classmethod
    def IS_CHANGED(cls, key_file="", key_path="", **_):
        return key_file_digest(key_file, key_path)

    def load(self, key_file, password, key_path=""):
        key = difp_keys.read_difp_key(resolve_key_path(key_file, key_path or ""), password or None)
        return (key, key.steps)


class DiffPrivacyDIFPRecover:
    DESCRIPTION = ("DIFP recovery (Sec. 3.3.3): DDIM from F_i under the key's condition, each step corrected against "
                   "the gradient of D = cosine distance between the predicted face and the original's identity "
                   "stored in the key (Eq. 17 adapted: as printed it needs the original); the recovered face crop is "
                   "pasted back into the protected photo where it was cut (read only outside the face). Refuses keys "
                   "of another model, image size or step count.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("The checkpoint's MODEL the key was made with (no streams).")),
            "vae": ("VAE", tip("Its VAE: decodes the result (and the predictions for the correction).")),
            "key": ("DIFP_KEY", tip("From Load DIFP Key or DIFP Protect.")),
            "steps": ("INT", tip("DDIM steps; must equal the key's (Load DIFP Key's steps output).", default=50,
                                 min=1, max=1000)),
            "guidance_scale": ("FLOAT", tip("lambda_t of Eq. 17 (0: plain DDIM, no face model needed).", default=1.0,
                                            min=0.0, max=100.0, step=0.05)),
        }, "optional": {
            "face_model": ("FACE_MODEL", tip("The face model the key was made with (its name is checked); needed "
                                             "when guidance_scale > 0.")),
            "protected": ("IMAGE", tip("The protected photo (one): a key of a face crop records where it was cut and "
                                       "the recovered face is pasted back into this photo at its size (the key holds "
                                       "nothing of the photo outside the face).")),
        }}

    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("recovered", "latent")
    OUTPUT_TOOLTIPS = ("The recovered photo at its size (a face-crop key, pasted into the protected photo), or the "
                       "recovered image (a key made before face crops).", "The recovered latent (the face crop).")
    FUNCTION = "recover"
    CATEGORY = DIFP_CATEGORY

    def recover(self, model, vae, key, steps, guidance_scale, face_model=None, protected=None):
        z = difp_keys.recover(model, vae, face_model, key, steps, guidance_scale)
        decoded = vae.decode(z)[..., :3]
        if key.face_crops is None:
            return (decoded, {"samples": z})
        photo = None if protected is None else rgb_batch(protected, "protected")
        return (paste_recovered(key.face_crops, photo, decoded, "DIFP key"), {"samples": z})


class DiffPrivacyTrainDIFPAdapters:
    DESCRIPTION = ("DIFP's own training (Eq. 9, then Eq. 11): identity (FaceID-layout) and style (IP-Adapter layout) "
                   "adapters learnt on your frozen SD 1.5 UNet over a folder of faces; stage 1 with both conditions, "
                   "stage 2 with each condition dropped to ∅ with probability p (both dropped = Eq. 11's unconditional "
                   "loss). Writes IP-Adapter-format files into models/ipadapter/ (the identity-streams loader reads "
                   "them). Interruptible and resumable. A GPU job: paper settings Adam, lr 10^-4.5, weight decay "
                   "1e-3, batch 16.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", tip("The frozen SD 1.5 MODEL the adapters are for.")),
            "clip": ("CLIP", tip("Encodes the empty prompt the adapters are trained with.")),
            "vae": ("VAE", tip("Encodes the faces.")),
            "clip_vision": ("CLIP_VISION", tip("Style condition: its image embeds.")),
            "face_model": ("FACE_MODEL", tip("Identity condition: its embedding (arcface-r50 of buffalo_l is FaceID's "
                                             "space).")),
            "folder": ("STRING", tip("A folder of face photos under ComfyUI's input folder (png/jpg/webp).",
                                     default="difp-faces")),
            "name": ("STRING", tip("File name stem in models/ipadapter/: <name>-identity.safetensors and "
                                   "<name>-style.safetensors (and <name>.train.pt to resume).", default="difp")),
            "steps": ("INT", tip("Total optimisation steps (both stages).", default=2000, min=1, max=10_000_000)),
            "stage1_fraction": ("FLOAT", tip("Fraction of the steps in stage 1 (full conditions, Eq. 9); the rest "
                                             "drop conditions (Eq. 11).", default=0.5, min=0.0, max=1.0, step=0.05)),
            "drop_probability": ("FLOAT", tip("Stage 2: each condition replaced by ∅ with this probability (the "
                                              "paper's '40%').", default=0.4, min=0.0, max=1.0, step=0.05)),
            "batch_size": ("INT", tip("Images per step (paper: 16).", default=16, min=1, max=256)),
            "learning_rate": ("FLOAT", tip("Adam learning rate (paper: 10^-4.5 = 3.16e-5).", default=10 ** -4.5,
                                           min=1e-8, max=1.0, step=1e-6)),
            "weight_decay": ("FLOAT", tip("Weight decay (paper: 1e-3).", default=1e-3, min=0.0, max=1.0, step=1e-4)),
            "resume": ("BOOLEAN", tip("Continue from <name>.train.pt when it exists.", default=True)),
            "seed": ("INT", tip("Seed of the draws.", default=0, min=0, max=0xFFFFFFFFFFFFFFFF)),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("identity_adapter_file", "style_adapter_file")
    OUTPUT_TOOLTIPS = ("The identity adapter's file name in models/ipadapter/.",
                       "The style adapter's file name in models/ipadapter/.")
    FUNCTION = "train"
    CATEGORY = DIFP_CATEGORY
    OUTPUT_NODE = True

    def train(self, model, clip, vae, clip_vision, face_model, folder, name, steps, stage1_fraction, drop_probability,
              batch_size, learning_rate, weight_decay, resume, seed, unique_id=None):
        options = difp_training.DIFPTrainingOptions(steps=steps, stage1_fraction=stage1_fraction,
                                                    drop_probability=drop_probability, batch_size=batch_size,
                                                    learning_rate=learning_rate, weight_decay=weight_decay, seed=seed)
        result = difp_training.train_from_folder(model, clip, vae, clip_vision, face_model, folder, name, options,
                                                 resume=resume, progress=StepProgress(steps, unique_id))
        return {"ui": {"text": [result.summary()]}, "result": (result.identity_file, result.style_file)}


NODE_CLASS_MAPPINGS = {
    "DiffPrivacyDIFPGuider": DiffPrivacyDIFPGuider,
    "DiffPrivacyRealismDDIMSampler": DiffPrivacyRealismDDIMSampler,
    "DiffPrivacyDIFPProtect": DiffPrivacyDIFPProtect,
    "DiffPrivacySaveDIFPKey": DiffPrivacySaveDIFPKey,
    "DiffPrivacyLoadDIFPKey": DiffPrivacyLoadDIFPKey,
    "DiffPrivacyDIFPRecover": DiffPrivacyDIFPRecover,
    "DiffPrivacyTrainDIFPAdapters": DiffPrivacyTrainDIFPAdapters,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffPrivacyDIFPGuider": "DIFP Guider (dual CFG, identity + style)",
    "DiffPrivacyRealismDDIMSampler": "DIFP Realism DDIM Sampler (ILVR)",
    "DiffPrivacyDIFPProtect": "DIFP Protect",
    "DiffPrivacySaveDIFPKey": "Save DIFP Key",
    "DiffPrivacyLoadDIFPKey": "Load DIFP Key",
    "DiffPrivacyDIFPRecover": "DIFP Recover",
    "DiffPrivacyTrainDIFPAdapters": "Train DIFP Adapters",
}
