"""The diffusion methods of the dataset command (``scripts/anonymize_dataset.py``), as :class:`.dataset.Method`
entries: Diff-Privacy anonymization with a text Key-E and Diffusion De-ID (:mod:`.deid_dataset`). The command line
adds the baselines (blur, pixelate, mosaic: ``evaluation/baselines.py``).

Both run through the one face pipeline (:func:`.contract.protect`, as the nodes do): detect -> choose the faces
(``faces``) -> crop each (``crop_factor``; or ``mode=whole frame``: the photo letterboxed) -> the method at the
working resolution -> pasted back into the photo at its own size (every pixel outside the masks the input's). The
output is the photo's size; its receipt measures the faces the plan protected (:meth:`.dataset.Worker.receipt`);
a key records the plan (key-file format version 2), so Recover returns the whole photo."""
from __future__ import annotations

import torch

from ..guidance.working_image import MAX_SIDE
from . import contract, deid_dataset
from .dataset import (COMMON, PIPELINE, Method, Protected, Setting, load_checkpoint, load_face_model, pick_device,
                      pipeline_options)

TAU = 0.4  # the paper's anonymization tau (Key-E above it, UC below)


class DiffPrivacyAnonymizeWorker:
    """Diff-Privacy anonymization with a text Key-E (one prompt; learning a Key-E per image is a GPU job: run the
    learn-key-e workflow per image instead): each chosen face's crop protected (:data:`.diff_privacy.ANONYMIZE`),
    pasted back; Key-I by DDIM inversion of each crop, in one sealed key file per photo with the crops' plan."""

    def __init__(self, settings: dict):
        from ..inversion.fingerprint import clip_fingerprint, model_fingerprint
        from ..inversion.key_e import KeyE, encode_text

        pick_device()
        self.settings = settings
        self.options = pipeline_options("diff-privacy-anonymize", settings)
        self.model, clip, self.vae = load_checkpoint(settings)
        self.guided_by = load_face_model(settings["face_model"], settings["detect_size"])
        with torch.inference_mode():
            self.key_e = KeyE.from_texts(clip, settings["prompt"])
            self.uncond = encode_text(clip, "")
        self.fingerprints = {"model_fingerprint": model_fingerprint(self.model),
                             "clip_fingerprint": clip_fingerprint(clip)}

    def protect(self, image: torch.Tensor, seed: int) -> Protected:
        from . import diff_privacy
        from ..inversion.ddim import make_key_i
        from ..inversion.key_bundle import LATENT_SCALE, bundle_tensors
        from ..inversion.keyfile import META_FACE_CROPS, key_bundle_metadata

        s, method = self.settings, diff_privacy.ANONYMIZE
        protection = diff_privacy.ProtectionSettings("anonymize", seed, s["steps"], s["strength"], TAU, 1,
                                                     guidance_scale=s["guidance_scale"], faces=self.options.faces)
        with torch.inference_mode():
            planned = contract.plan_batch(image[None], method, self.guided_by, self.options, s["resolution"])
            models = contract.Models(model=self.model, vae=self.vae, face_model=self.guided_by,
                                     extra={"key_es": {p: self.key_e for p in planned.positions()},
                                            "uncond": self.uncond})
            delivered = contract.protect(image[None], method, models, protection, self.options, s["resolution"],
                                         receipt=False, planned=planned).delivered[0]  # the Worker measures it
            key_i = make_key_i(self.model, self.key_e, self.vae.encode(torch.cat(delivered.crops)), s["steps"])
        tensors = bundle_tensors(key_i, self.key_e.to_conditioning(), len(delivered.crops))
        h, w = tensors["key_i"].shape[2:]
        metadata = key_bundle_metadata(steps=s["steps"], tau=TAU, strength=s["strength"],
                                       image_width=w * LATENT_SCALE, image_height=h * LATENT_SCALE,
                                       **self.fingerprints)
        metadata[META_FACE_CROPS] = delivered.plan.to_json()  # Recover pastes the faces back into the photo
        return Protected(delivered.images[0], key=(tensors, metadata), plan=delivered.plan,
                         info={"faces_protected": len(delivered.plan.crops)})


def check_resolution(settings: dict) -> None:
    if settings["resolution"] % 8:
        raise ValueError(f"setting resolution={settings['resolution']} must be a multiple of 8 (the VAE's factor)")


def _check_anonymize(settings: dict) -> None:
    check_resolution(settings)
    pipeline_options("diff-privacy-anonymize", settings)


DIFFUSION = {**COMMON, **PIPELINE,
             "resolution": Setting(int, 512, 64, MAX_SIDE, help="the working size of each face crop, a multiple of 8"),
             "prompt": Setting(str, "a photo of a person")}

METHODS: dict[str, Method] = {
    "diff-privacy-anonymize": Method("diff-privacy-anonymize", DiffPrivacyAnonymizeWorker, {
        **DIFFUSION,
        "steps": Setting(int, 50, 1, 1000, help="DDIM steps"),
        "strength": Setting(float, 0.6, 0.0, 1.0, low_open=True, help="the share of the schedule re-noised"),
        "guidance_scale": Setting(float, 1.0, 0.0, 100.0, low_open=True),
    }, diffusion=True, check=_check_anonymize),
    "diffusion-de-id": Method("diffusion-de-id", deid_dataset.DeIDWorker, {**DIFFUSION, **deid_dataset.SETTINGS},
                              diffusion=True, prepare=deid_dataset.prepare, check=deid_dataset.check_settings),
}
