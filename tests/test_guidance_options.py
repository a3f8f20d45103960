"""Working resolution of the protection / Key-I nodes, landmark re-detection, and the unclamped guidance decode."""
import pytest
import torch
import torch.nn.functional as F

import comfy.model_sampling
from diffprivacy.guidance.autograd import gradients_enabled
from diffprivacy.guidance.energy import hide_energy
from diffprivacy.guidance.face.base import Face
from diffprivacy.guidance.guided_ddim import IdentityGuidance, sample_guided_ddim
from diffprivacy.guidance.vae_decode import make_vae_decoder, unclamped_output
from diffprivacy.guidance.ddim import ddim_sigmas
from diffprivacy.nodes.encrypt_nodes import DiffPrivacyAnonymize, DiffPrivacyHide, DiffPrivacyGuidedDDIMSampler
from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI
from toy_models import GaussianDenoiser, ToyDecoder, ToyFaceModel, toy_latent

ODD = (75, 93)  # H, W: non-square, neither a multiple of 8


def _odd_image():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 6, 7, generator=g)
    return F.interpolate(low, size=ODD, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def keys(tiny_sd):
    _, clip, _ = tiny_sd
    with torch.inference_mode():
        stages = [clip.encode_from_tokens_scheduled(clip.tokenize(f"stage {i}"))[0][0] for i in range(10)]
        uc = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return [[torch.cat(stages), {}]], uc


def test_resolution_default_is_512_on_every_node_that_takes_an_image():
    for node in (DiffPrivacyAnonymize, DiffPrivacyHide, DiffPrivacyGuidedDDIMSampler, DiffPrivacyMakeKeyI):
        spec = node.INPUT_TYPES()["required"]["resolution"]
        assert spec[0] == "INT" and spec[1]["default"] == 512 and spec[1]["tooltip"]


@pytest.mark.parametrize("resolution, size", [(64, (64, 64)), (0, (88, 88))])
def test_protection_and_key_i_work_at_the_same_resolution(tiny_sd, keys, resolution, size):
    from diffprivacy.methods.pipeline import PipelineOptions
    model, _, vae = tiny_sd
    key_e, uc = keys
    image, face, whole = _odd_image(), ToyFaceModel(), PipelineOptions(mode="whole frame")
    with torch.inference_mode():
        anon = DiffPrivacyAnonymize().anonymize(model, vae, face, image, key_e, uc, 0, 4, 0.5, 0.4, 2, 1.0, 1.0,
                                                resolution=resolution, pipeline=whole)["result"]
        hidden = DiffPrivacyHide().hide(model, vae, face, image, key_e, uc, 0, 4, 0.5, 0.6, 1, 1.0, 1.0,
                                        redetect_every=1, resolution=resolution, pipeline=whole)["result"][0]
        (key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, key_e, vae, image, 4, resolution=resolution,
                                                    crops=anon[8])
    # the photo comes back at its own size; the working image is its letterbox square at the resolution
    assert anon[0].shape == (2, *ODD, 3) and hidden.shape == (1, *ODD, 3) and anon[5].shape == (1, *size, 3)
    latent_size = (size[0] // 8, size[1] // 8)
    assert anon[1]["samples"].shape[-2:] == latent_size and key_i["samples"].shape[-2:] == latent_size


def test_bad_resolutions_fail_clearly(tiny_sd, keys):
    model, _, vae = tiny_sd
    key_e, _ = keys
    with torch.inference_mode(), pytest.raises(ValueError, match="multiple of 8"):
        DiffPrivacyMakeKeyI().make_key_i(model, key_e, vae, _odd_image(), 4, resolution=100)


class MovingFace(ToyFaceModel):
    """A detector whose n-th call finds a face shifted by n pixels (none on the calls in ``blind``);
    ``seen`` records the landmarks every embedding was aligned with."""

    def __init__(self, blind=()):
        super().__init__()
        self.calls, self.blind, self.seen = 0, set(blind), []

    def detect(self, image):
        assert image.dim() == 3 and image.shape[-1] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1
        self.calls += 1
        if self.calls in self.blind:
            return []
        face = super().detect(image)[0]
        return [Face(box=face.box + self.calls, landmarks=face.landmarks + self.calls, score=face.score)]

    def embed(self, images, landmarks):
        self.seen.append(landmarks.detach().clone())
        return super().embed(images, landmarks)


def _guided_run(face, redetect_every, steps=7, batch=2):
    dec, original = ToyDecoder(), toy_latent(10)
    guidance = IdentityGuidance.from_image(face, dec, dec(original)[0].permute(1, 2, 0), hide_energy(),
                                           redetect_every=redetect_every)
    base = face.seen.pop()[0]  # the reference's landmarks (detector call 1)
    sigmas = ddim_sigmas(comfy.model_sampling.ModelSamplingDiscrete(), steps, 1.0)
    x = original + sigmas[0] * torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    sample_guided_ddim(GaussianDenoiser(toy_latent(11), 0.3), x, sigmas, guidance=guidance, scale=0.5)
    return base, face.seen[-steps:]


def test_redetection_every_k_steps_with_fallback_when_no_face_is_found():
    face = MovingFace(blind={5})  # call 1: the reference; steps 3 and 6 detect on samples 0, 1 (calls 2-5)
    base, used = _guided_run(face, redetect_every=3)
    assert face.calls == 5
    for step in range(3):
        assert torch.equal(used[step], base.expand(2, 5, 2)), step
    for step in (3, 4, 5):
        assert torch.equal(used[step], torch.stack([base + 1, base + 2])), step  # shifted as the detector moved
    assert torch.equal(used[6], torch.stack([base + 3, base + 2]))  # sample 1: no face found, previous kept

    face.calls, face.blind = 0, set()
    base, used = _guided_run(face, redetect_every=3)  # a new run starts from the original's landmarks again
    assert torch.equal(used[0], base.expand(2, 5, 2)) and torch.equal(used[3], torch.stack([base + 1, base + 2]))


def test_no_redetection_by_default():
    face = MovingFace()
    base, used = _guided_run(face, redetect_every=0)
    assert face.calls == 1 and all(torch.equal(u, base.expand(2, 5, 2)) for u in used)


def test_guidance_decode_is_unclamped_so_saturated_pixels_keep_their_gradient():
    import comfy.latent_formats
    import comfy.sd
    import comfy.taesd.taesd
    from tiny_models import random_init_

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    random_init_(taesd, 3)
    with torch.no_grad():
        taesd.taesd_decoder[-1].weight.mul_(30.0)  # a decoder that overshoots [-1, 1] almost everywhere
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    fmt = comfy.latent_formats.SD15()
    z = toy_latent(4, (1, 4, 4, 4))
    decode = make_vae_decoder(vae, fmt)
    with gradients_enabled():
        zg = z.clone().requires_grad_(True)
        image = decode(zg)
        saturated = (image < 0) | (image > 1)
        assert saturated.float().mean() > 0.3
        (grad,) = torch.autograd.grad(image[saturated].sum(), zg, retain_graph=True)
        clamped = vae.process_output(image * 2 - 1)  # ComfyUI's own mapping: flat where saturated
        (zero,) = torch.autograd.grad(clamped[saturated].sum(), zg)
    assert grad.abs().sum() > 0 and zero.abs().sum() == 0
    with torch.inference_mode():  # the same image as VAE Decode, up to the clamp
        stock = vae.decode(fmt.process_out(z))
    assert torch.allclose(image.detach().clamp(0, 1).movedim(1, -1), stock, atol=1e-4)


def test_other_output_mappings_are_kept():
    identity = lambda x: x  # noqa: E731  (ComfyUI's mapping for VAEs that decode to [0, 1] already)
    assert unclamped_output(identity) is identity
    x = torch.tensor([-2.0, 0.3, 2.0])
    assert torch.equal(unclamped_output(lambda t: torch.clamp((t + 1) / 2, 0, 1))(x), (x + 1) / 2)
