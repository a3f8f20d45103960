"""Encrypt/recover nodes on the tiny SD checkpoint, run as ComfyUI runs nodes (inference mode)."""
import pytest
import torch
import torch.nn.functional as F

from diffprivacy.guidance.ddim import ddim_sigmas
from diffprivacy.guidance.working_image import working_image
from diffprivacy.nodes.encrypt_nodes import (DiffPrivacyAnonymize, DiffPrivacyDDIMSigmas,
                                             DiffPrivacyGuidedDDIMSampler, DiffPrivacyHide)
from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI, DiffPrivacyRecover
from diffprivacy.methods.pipeline import PipelineOptions
from toy_models import ToyFaceModel

WHOLE = PipelineOptions(mode="whole frame")  # the toy detector's face fills the frame: guidance tests on the frame

PROMPTS = [f"a portrait photo, stage {i}, {w}" for i, w in enumerate("red orange yellow green blue indigo violet "
                                                                      "black white grey".split())]
OTHER_PROMPTS = [f"a landscape painting number {i}" for i in range(10)]


def _cond(clip, texts):
    with torch.inference_mode():
        tensors = [clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in texts]
    return [[torch.cat(tensors), {}]]


def _image(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def parts(tiny_sd):
    model, clip, vae = tiny_sd
    return model, clip, vae, _cond(clip, PROMPTS), _cond(clip, [""])


def test_recovery_with_the_right_keys_beats_every_wrong_key(parts):
    model, clip, vae, key_e, uc = parts
    wrong_e, uc_as_key_e = _cond(clip, OTHER_PROMPTS), [[uc[0][0].repeat(10, 1, 1), {}]]
    with torch.inference_mode():
        original = vae.encode(working_image(_image(1), vae, 64))
        steps = 50
        (key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, key_e, vae, _image(1), steps, resolution=64)
        ki = key_i["samples"]  # a wrong Key-I: noise of the same size and spread (as in the paper's Fig. 7)
        # (with the right one's provenance: a stolen or guessed Key-I passes the checks and still fails)
        wrong_i = {**key_i, "samples": torch.randn(ki.shape, generator=torch.Generator().manual_seed(5)) * ki.std()}

        def err(e, i):
            rec, _ = DiffPrivacyRecover().recover(model, e, i, steps)
            return float((rec["samples"] - original).pow(2).mean().sqrt())
        right = err(key_e, key_i)
        wrong = {"Key-I": err(key_e, wrong_i), "Key-E": err(wrong_e, key_i), "UC": err(uc_as_key_e, key_i)}
    scale = float(original.std())
    assert right < 0.3 * scale, (right, scale)
    for name, e in wrong.items():  # paper Fig. 7: every wrong key fails
        assert e > 2.5 * right, (name, e, right)
    assert key_i["diffprivacy_key_i"]["steps"] == steps
    with pytest.raises(ValueError, match="made with 50 DDIM steps"):
        DiffPrivacyRecover().recover(model, key_e, key_i, 25)


def _identity_distance(face, images, reference_image):
    ref = face.embed(reference_image.permute(0, 3, 1, 2), None)
    emb = face.embed(images.permute(0, 3, 1, 2), None)
    return (1 - F.cosine_similarity(emb, ref)).mean().item()


def test_anonymize_node_gives_distinct_outputs_further_from_the_original(parts):
    model, clip, vae, key_e, uc = parts
    face, image = ToyFaceModel(), _image(3)
    with torch.inference_mode():
        def run(lam):
            return DiffPrivacyAnonymize().anonymize(model, vae, face, image, key_e, uc, 7, 10, 0.6, 0.4, 4, lam, 1.0,
                                                    resolution=64, pipeline=WHOLE)["result"]
        plain, guided = run(0.0), run(20.0)
    images, latents, sampler, sigmas, schedule = guided[:5]
    assert images.shape == (4, 64, 64, 3) and latents["samples"].shape == (4, 4, 8, 8)
    assert (images[0] - images[1]).abs().max() > 1e-3  # four different noisings
    assert torch.equal(sigmas, ddim_sigmas(model.get_model_object("model_sampling"), 10, 0.6))
    assert {e[1]["diffprivacy_stage"] for e in schedule} >= {-1, 4, 5, 9}
    assert _identity_distance(face, guided[0], image) > _identity_distance(face, plain[0], image) + 0.02


def test_hide_node_keeps_identity_closer_and_sampler_plugs_into_sampler_custom(parts):
    import comfy_extras.nodes_custom_sampler as ncs
    model, clip, vae, key_e, uc = parts
    face, image = ToyFaceModel(), _image(4)
    with torch.inference_mode():
        def run(lam):
            return DiffPrivacyHide().hide(model, vae, face, image, key_e, uc, 3, 10, 0.8, 0.6, 1, lam, lam,
                                          resolution=64, pipeline=WHOLE)["result"]
        plain, guided = run(0.0), run(20.0)
        assert _identity_distance(face, guided[0], image) < _identity_distance(face, plain[0], image) - 0.02
        # the exposed parts rewire into the stock SamplerCustom, including the through-UNet gradient
        (sampler,) = DiffPrivacyGuidedDDIMSampler().sampler(model, vae, face, image, "hide", 0.6, 20.0, 20.0, 1.0,
                                                            "through UNet", resolution=64)
        (sigmas,) = DiffPrivacyDDIMSigmas().sigmas(model, 10, 0.8)
        latent = {"samples": vae.encode(image)}
        out = ncs.SamplerCustom.execute(model, True, 3, 1.0, guided[4], guided[4], sampler, sigmas, latent)
    samples = (out.result if hasattr(out, "result") else out)[0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert not torch.allclose(samples, plain[1]["samples"], atol=1e-4)


class _FacelessWhenFlat(ToyFaceModel):
    """The toy recognizer, with a detector that finds nothing in a flat image."""

    def detect(self, image):
        return [] if float(image.std()) < 0.01 else super().detect(image)


def test_a_batch_is_protected_image_by_image_and_a_faceless_image_is_reported(parts, tmp_path):
    import folder_paths
    from diffprivacy.nodes.key_nodes import DiffPrivacySaveKey
    model, clip, vae, key_e, uc = parts
    batch = torch.cat([_image(0), torch.full_like(_image(0), 0.5), _image(2)])
    key_es = key_e * 3  # Conditioning Combine of three Key-Es: one per image, in batch order
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    face = _FacelessWhenFlat()  # built outside inference mode, as a loader node's model is thawed for autograd
    try:
        with torch.inference_mode():
            out = DiffPrivacyAnonymize().anonymize(model, vae, face, batch, key_es, uc, 0, 10, 0.6, 0.4,
                                                   2, 1.0, 1.0, resolution=64, pipeline=WHOLE)["result"]
            images, latents, originals, kept_key_e, report = out[0], out[1], out[5], out[6], out[7]
            (key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, kept_key_e, vae, originals, 10, resolution=64)
            saved = DiffPrivacySaveKey().save(key_i, kept_key_e, model, clip, 10, 0.4, 0.6, "diffprivacy/key", "",
                                              protected=images)
    finally:
        folder_paths.set_output_directory(old)
    assert images.shape[0] == 4 and latents["samples"].shape[0] == 4  # 2 outputs for each of 2 protected images
    assert originals.shape[0] == 2 and torch.allclose(originals[1], working_image(_image(2), vae, 64)[0], atol=1e-5)
    assert key_i["samples"].shape[0] == 2 and len(kept_key_e) == 2
    paths = saved["result"][0].splitlines()
    assert len(paths) == 2 and len(set(paths)) == 2 and all((tmp_path / "diffprivacy").glob("key_*"))
    assert "protected 2 of 3" in report and "image 1: not protected: No face was detected" in report


def test_a_batch_where_no_image_has_a_face_fails_and_says_why(parts):
    model, clip, vae, key_e, uc = parts
    flat = torch.full_like(_image(0), 0.5).repeat(2, 1, 1, 1)
    face = _FacelessWhenFlat()
    with torch.inference_mode(), pytest.raises(ValueError, match="no image of the batch could be protected"):
        DiffPrivacyAnonymize().anonymize(model, vae, face, flat, key_e, uc, 0, 10, 0.6, 0.4, 1,
                                         1.0, 1.0, resolution=64, pipeline=WHOLE)


def test_text_key_e_is_ten_stages_the_key_file_accepts(tiny_sd):
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyTextKeyE
    from diffprivacy.inversion.key_bundle import bundle_from_tensors, bundle_tensors
    _, clip, _ = tiny_sd
    with torch.inference_mode():
        one, uc = DiffPrivacyTextKeyE().encode(clip, "a photo of a person")
        ten, _ = DiffPrivacyTextKeyE().encode(clip, "\n".join(PROMPTS))
        with pytest.raises(ValueError, match="10 lines"):
            DiffPrivacyTextKeyE().encode(clip, "one\ntwo\nthree")
    expected = _cond(clip, PROMPTS)[0][0]
    assert one[0][0].shape == (10,) + tuple(uc[0][0].shape[1:])
    assert torch.equal(one[0][0][0], one[0][0][9])  # one line: the same prompt at every stage
    assert torch.allclose(ten[0][0], expected) and not torch.allclose(ten[0][0][0], ten[0][0][1])
    assert not torch.allclose(uc[0][0][0], one[0][0][0])
    key_i = {"samples": torch.zeros(1, 4, 8, 8)}
    _, back = bundle_from_tensors(bundle_tensors(key_i, ten), {})  # what Save/Load Key do
    assert torch.allclose(back[0][0], ten[0][0])
