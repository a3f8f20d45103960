"""The diffusion methods of the dataset command (``scripts/anonymize_dataset.py``), as :class:`.dataset.Method`
entries: Diff-Privacy anonymization with a text Key-E and Diffusion De-ID (:mod:`.deid_dataset`). The command line
adds the baselines (blur, pixelate, mosaic: ``evaluation/baselines.py``)."""
from __future__ import annotations

import torch

from . import deid_dataset
from .dataset import COMMON, Method, Protected, Setting, load_checkpoint, load_face_model, pick_device


def _diff_privacy_anonymize(settings: dict):
    """Diff-Privacy anonymization with a text Key-E (one prompt; learning a Key-E per image is a GPU job:
    run the learn-key-e workflow per image instead), Key-I by DDIM inversion, both in a sealed key file."""
    from . import diff_privacy
    from .diff_privacy import FaceChoice
    from ..guidance.working_image import working_image
    from ..inversion.ddim import make_key_i
    from ..inversion.fingerprint import clip_fingerprint, model_fingerprint
    from ..inversion.key_bundle import LATENT_SCALE, bundle_tensors
    from ..inversion.key_e import KeyE, encode_text
    from ..inversion.keyfile import key_bundle_metadata

    pick_device()
    model, clip, vae = load_checkpoint(settings)
    face_model = load_face_model(settings["face_model"], settings["detect_size"])
    steps, strength, tau, resolution = settings["steps"], settings["strength"], 0.4, settings["resolution"]
    with torch.inference_mode():
        key_e = KeyE.from_texts(clip, settings["prompt"])
        uncond = encode_text(clip, "")
    fingerprints = {"model_fingerprint": model_fingerprint(model), "clip_fingerprint": clip_fingerprint(clip)}

    def protect(image: torch.Tensor, seed: int) -> Protected:
        with torch.inference_mode():
            work = working_image(image[None], vae, resolution)
            run = diff_privacy.anonymize(model, vae, face_model, work, key_e.schedule(uncond, tau), seed=seed,
                                         steps=steps, strength=strength, num_outputs=1,
                                         guidance_scale=settings["guidance_scale"], faces=FaceChoice(settings["faces"]))
            key_i = make_key_i(model, key_e, vae.encode(work), steps)
        tensors = bundle_tensors(key_i, key_e.to_conditioning())
        h, w = tensors["key_i"].shape[2:]
        metadata = key_bundle_metadata(steps=steps, tau=tau, strength=strength, image_width=w * LATENT_SCALE,
                                       image_height=h * LATENT_SCALE, **fingerprints)
        return Protected(run.images[0], key=(tensors, metadata))
    return protect


def check_resolution(settings: dict) -> None:
    if settings["resolution"] % 8:
        raise ValueError(f"setting resolution={settings['resolution']} must be a multiple of 8 (the VAE's factor)")


DIFFUSION = {**COMMON, "resolution": Setting(int, 512, 64, 4096, help="the working size, a multiple of 8"),
             "prompt": Setting(str, "a photo of a person")}

METHODS: dict[str, Method] = {
    "diff-privacy-anonymize": Method("diff-privacy-anonymize", _diff_privacy_anonymize, {
        **DIFFUSION,
        "steps": Setting(int, 50, 1, 1000, help="DDIM steps"),
        "strength": Setting(float, 0.6, 0.0, 1.0, low_open=True, help="the share of the schedule re-noised"),
        "guidance_scale": Setting(float, 1.0, 0.0, 100.0, low_open=True),
        "faces": Setting(str, "all", choices=("all", "largest")),
    }, diffusion=True, check=check_resolution),
    "diffusion-de-id": Method("diffusion-de-id", deid_dataset.DeIDWorker, {**DIFFUSION, **deid_dataset.SETTINGS},
                              diffusion=True, prepare=deid_dataset.prepare, check=deid_dataset.check_settings),
}
