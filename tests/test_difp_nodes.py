"""DIFP nodes on the tiny model with random-weight adapter fixtures: protect -> save (sealed) -> load -> recover,
the face mask keeping everything outside it, and the bad input the issue lists."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import ip_adapter_fixtures as fx
from diffprivacy.guidance.face.base import Face, NoFaceError
from toy_models import ToyFaceModel


class SmallFace(ToyFaceModel):
    """A 512-d toy recognizer (FaceID's width) whose detector finds one small centred face (or none)."""

    def __init__(self, seed=1, found=True):
        super().__init__(dim=512, seed=seed)
        self.name, self.found = "arcface-r50", found

    def detect(self, image):
        if not self.found:
            return []
        h, w = image.shape[:2]
        lms = torch.tensor([[0.45 * w, 0.45 * h], [0.55 * w, 0.45 * h], [0.5 * w, 0.5 * h], [0.46 * w, 0.56 * h],
                            [0.54 * w, 0.56 * h]])
        return [Face(box=torch.tensor([0.4 * w, 0.4 * h, 0.6 * w, 0.62 * h]), landmarks=lms, score=0.99)]


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_sd, tiny_clip_vision):
    return fx.load_tiny_identity_and_style(tmp_path_factory.mktemp("difp_nodes"), tiny_sd[0], tiny_clip_vision)


def _photo(seed=3, size=128):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=size, mode="bicubic").clamp(0, 1).permute(0, 2, 3, 1)


def _protect(tiny_sd, tiny_clip_vision, parts, **kw):
    from diffprivacy.nodes.difp_nodes import DiffPrivacyDIFPProtect
    model, clip, vae = tiny_sd
    model = kw.pop("model", model)
    args = dict(donor="synthetic", strength=0.8, steps=10, s_id=1.5, s_sty=1.0, realism="fixed", g_rea=0.6,
                region="face (feathered mask)", num_outputs=2, seed=0, resolution=128, identity_adapter=parts[0],
                style_adapter=parts[1], clip_vision=tiny_clip_vision, style_source="original")
    args.update(kw)
    face_model = args.pop("face_model", SmallFace())
    image = args.pop("image", _photo())
    with torch.inference_mode():
        return DiffPrivacyDIFPProtect().protect(model, clip, vae, face_model, image, **args)


def test_protect_changes_the_face_keeps_pixels_outside_the_mask_and_the_key_recovers(tiny_sd, tiny_clip_vision, parts,
                                                                                      tmp_path, monkeypatch):
    import folder_paths
    from diffprivacy.nodes.difp_nodes import DiffPrivacyDIFPRecover, DiffPrivacyLoadDIFPKey, DiffPrivacySaveDIFPKey
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    out = _protect(tiny_sd, tiny_clip_vision, parts)
    protected, key, original, mask, receipt = out["result"]
    assert protected.shape == (2, 128, 128, 3) and original.shape == (1, 128, 128, 3)
    assert json.loads(receipt)["outputs"][0]["faces"][0]["crop_size"] == key.face_crops["crops"][0]["side"]
    outside = mask[0] == 0
    assert outside.float().mean() > 0.5
    assert (protected - original).abs()[:, outside].max() <= 1 / 255        # the bound (exact here)
    inside = mask[0] == 1
    assert (protected - original).abs()[:, inside].mean() > 0.02            # the face itself changed
    assert (protected[0] - protected[1]).abs()[inside].mean() > 1e-3        # independent seeds
    saved = DiffPrivacySaveDIFPKey().save(key, "diffprivacy/difp", "secret")
    path = saved["result"][0]
    loaded, steps = DiffPrivacyLoadDIFPKey().load("", "secret", key_path=path)
    assert steps == 10
    model, _, vae = tiny_sd
    from diffprivacy.methods.pipeline import Plan
    plan = Plan.from_dict(loaded.face_crops)                                # the key records its face crop
    with torch.inference_mode():
        with pytest.raises(ValueError, match="protected photo"):
            DiffPrivacyDIFPRecover().recover(model, vae, loaded, steps, 0.0)
        recovered, latent = DiffPrivacyDIFPRecover().recover(model, vae, loaded, steps, 0.0, protected=protected[:1])
        (crop,) = plan.cut(original[0])
        (protected_crop,) = plan.cut(protected[0])
        target, recovered_crop = vae.decode(vae.encode(crop)), vae.decode(latent["samples"])
    assert recovered.shape == original.shape                                # the photo at its size
    assert torch.equal(recovered[0][outside], protected[0][outside])        # outside the masks: the protected photo
    err = (recovered_crop - target).abs().mean()                            # the face crop: recovery lands on it
    assert err < 0.5 * (protected_crop - target).abs().mean() or err < 0.01


def test_whole_frame_changes_outside_the_face_too(tiny_sd, tiny_clip_vision, parts):
    from diffprivacy.methods.pipeline import PipelineOptions
    out = _protect(tiny_sd, tiny_clip_vision, parts, region="whole frame", num_outputs=1,
                   pipeline=PipelineOptions(mode="whole frame"))
    protected, _, original, mask, _ = out["result"]
    assert bool((mask == 1).all())
    assert (protected - original).abs()[:, :10, :10].mean() > 0.01


def test_bad_input(tiny_sd, tiny_clip_vision, parts, caplog):
    with pytest.raises(ValueError, match="beyond the last timestep"):
        _protect(tiny_sd, tiny_clip_vision, parts, strength=1.2)
    with pytest.raises(NoFaceError, match="No face was detected"):  # the pipeline finds no face to crop
        _protect(tiny_sd, tiny_clip_vision, parts, face_model=SmallFace(found=False))
    with pytest.raises(NoFaceError, match="donor image"):
        _protect(tiny_sd, tiny_clip_vision, parts, donor="image", donor_image=torch.zeros(1, 64, 64, 3),
                 face_model=_NoFaceOnBlack())
    with caplog.at_level(logging.WARNING, logger="diffprivacy"):
        from diffprivacy.methods.pipeline import PipelineOptions  # the toy recognizer sees the whole image: the
        same = _protect(tiny_sd, tiny_clip_vision, parts, donor="image", donor_image=_photo(), num_outputs=1,
                        pipeline=PipelineOptions(mode="whole frame"))  # donor photo is the original only uncropped
        assert "protects nothing" in same["ui"]["text"][0] and "protects nothing" in caplog.text
        plain = _protect(tiny_sd, tiny_clip_vision, parts, s_id=0.0, s_sty=0.0, num_outputs=1, identity_adapter=None,
                         style_adapter=None)
        assert "plain img2img" in plain["ui"]["text"][0]
        resized = _protect(tiny_sd, tiny_clip_vision, parts, style_image=_photo(5, 96), num_outputs=1,
                           style_source="another image")
        assert "resized" in resized["ui"]["text"][0]
    with pytest.raises(ValueError, match="needs an identity adapter"):
        _protect(tiny_sd, tiny_clip_vision, parts, identity_adapter=None)


class _NoFaceOnBlack(SmallFace):
    def detect(self, image):
        return [] if float(image.max()) == 0.0 else super().detect(image)


def test_every_difp_node_has_tooltips_a_description_and_is_registered():
    import importlib
    from diffprivacy.nodes.difp_nodes import NODE_CLASS_MAPPINGS
    registry = importlib.import_module("diffprivacy.nodes")
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id in registry.NODE_CLASS_MAPPINGS, node_id
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for section in ("required", "optional"):
            for name, spec in cls.INPUT_TYPES().get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name}"


# -- where the style and the realism reference come from (issue 24) ---------------------------------------------------
def _spy_protect(monkeypatch):
    """Record the MODEL (its streams), the reference and the settings DIFP's sampling gets."""
    from diffprivacy.methods import difp
    seen = {}
    real = difp.regenerate

    def spy(model, vae, image, conditioning, settings, mask=None, reference=None):
        seen.update(model=model, reference=reference, settings=settings, image=image)
        out = real(model, vae, image, conditioning, settings, mask, reference)
        seen["realism"] = out.realism
        return out
    monkeypatch.setattr(difp, "regenerate", spy)
    return seen


def test_style_source_and_realism_reference_are_the_explicit_choices_and_nothing_else(tiny_sd, tiny_clip_vision,
                                                                                     parts, monkeypatch):
    """original: the photo is I_sty / X_com; another image: the given one (the photo is not read for it); none: no
    style stream / no realism control. The node's text names each choice and its privacy cost."""
    from diffprivacy.guidance import identity_streams as ids
    seen = _spy_protect(monkeypatch)
    style_img, ref_img = _photo(5), _photo(6)

    def style_on(image):
        with torch.inference_mode():
            return ids.style_tokens(parts[1], tiny_clip_vision, image)[0]

    def latent(image):
        with torch.inference_mode():
            return tiny_sd[0].get_model_object("latent_format").process_in(tiny_sd[2].encode(image))

    def run(**kw):
        out = _protect(tiny_sd, tiny_clip_vision, parts, num_outputs=1, **kw)
        streams = ids.carried_streams(seen["model"])
        return out["ui"]["text"][0], (streams.streams if streams is not None else {}), seen["realism"]

    text, streams, realism = run(style_source="original", realism_reference="original")
    torch.testing.assert_close(streams["style"].on, style_on(seen["image"]))
    torch.testing.assert_close(realism.reference, latent(seen["image"]))
    assert "style: original: the original's CLIP-vision appearance" in text
    assert "realism reference: original: the original's low frequencies" in text
    text, streams, realism = run(style_source="another image", style_image=style_img,
                                 realism_reference="another image", reference=ref_img)
    torch.testing.assert_close(streams["style"].on, style_on(style_img))
    assert not torch.allclose(streams["style"].on, style_on(seen["image"]))
    torch.testing.assert_close(realism.reference, latent(ref_img))
    assert "nothing of the original" in text
    text, streams, realism = run(style_source="none", realism_reference="none")
    assert "style" not in streams and "identity" in streams and realism is None
    assert seen["settings"].s_sty == 0.0 and seen["settings"].realism is False
    assert "style: none" in text and "realism reference: none" in text
    with torch.inference_mode():  # a style stream built upstream (here from the original) cannot sneak in
        upstream, _ = ids.apply_identity_streams(tiny_sd[0], [ids.Stream("style", parts[1], style_on(_photo()),
                                                                         parts[1].off_tokens())])
    with pytest.raises(ValueError, match="the `model` input already carries style stream"):
        _protect(tiny_sd, tiny_clip_vision, parts, num_outputs=1, style_source="none", model=upstream)
    for kw, message in ((dict(style_source="another image"), "needs the image connected to style_image"),
                        (dict(style_image=style_img), "style_image is connected but the style source is 'original'"),
                        (dict(realism_reference="another image"), "needs the image connected to reference"),
                        (dict(reference=ref_img), "reference is connected but the realism reference source")):
        with pytest.raises(ValueError, match=message):
            _protect(tiny_sd, tiny_clip_vision, parts, num_outputs=1, **kw)


def test_the_node_defaults_do_not_feed_the_original_back_as_style():
    from diffprivacy.methods import difp
    from diffprivacy.nodes.difp_nodes import DiffPrivacyDIFPProtect
    required = DiffPrivacyDIFPProtect.INPUT_TYPES()["required"]
    assert required["style_source"][0] == difp.SOURCES and required["style_source"][1]["default"] == "none"
    assert required["realism_reference"][1]["default"] == "original"
    assert "costs privacy" in required["realism_reference"][1]["tooltip"]


class _GroupFace(SmallFace):
    """SmallFace's recognizer with dlib's detector on photos larger than 256 pixels (a real group photo)."""

    def detect(self, image):
        if max(image.shape[:2]) > 256:
            from face_fixtures import dlib_model
            return dlib_model().detect(image)
        return super().detect(image)


def test_a_group_photo_keeps_its_size_and_its_pixels_outside_the_mask_and_the_key_recovers_the_photo(
        tiny_sd, tiny_clip_vision, parts, tmp_path, monkeypatch):
    import folder_paths
    from conftest import shared_path
    from face_fixtures import load_photo
    from diffprivacy.methods.pipeline import Plan
    from diffprivacy.nodes.difp_nodes import DiffPrivacyDIFPRecover, DiffPrivacyLoadDIFPKey, DiffPrivacySaveDIFPKey
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    group = load_photo(shared_path("data", "photos", "group-6-faces.jpg"), max_side=4000)[None]
    out = _protect(tiny_sd, tiny_clip_vision, parts, image=group, face_model=_GroupFace(), steps=5, num_outputs=1)
    protected, key, original, mask, receipt = out["result"]
    outside = mask[0] == 0
    assert protected.shape == (1, 886, 1280, 3) and torch.equal(protected[0][outside], group[0][outside])
    (face,) = json.loads(receipt)["outputs"][0]["faces"]                   # the largest face, by default
    assert face["crop_size"] == key.face_crops["crops"][0]["side"] and face["working_resolution"] == 128
    path = DiffPrivacySaveDIFPKey().save(key, "diffprivacy/difp", "")["result"][0]
    loaded, steps = DiffPrivacyLoadDIFPKey().load("", "", key_path=path)
    model, _, vae = tiny_sd
    with torch.inference_mode():
        recovered, _ = DiffPrivacyDIFPRecover().recover(model, vae, loaded, steps, 0.0, protected=protected)
    assert recovered.shape == (1, 886, 1280, 3)
    assert torch.equal(recovered[0][outside], group[0][outside])            # the rest: the photo's own pixels
    assert Plan.from_dict(loaded.face_crops).mask().equal(mask[0])


def test_the_difp_method_runs_through_the_contract_on_a_batch_where_one_photo_has_no_face(tiny_sd, tiny_clip_vision,
                                                                                          parts):
    """difp.METHOD behind contract.protect: the photo with a face is delivered with its key, the black one is
    reported as not protected."""
    from diffprivacy.methods import contract, difp
    from diffprivacy.methods.difp_keys import DIFPKey
    model, clip, vae = tiny_sd
    photos = torch.cat([_photo(), torch.zeros(1, 128, 128, 3)])
    models = contract.Models(model=model, clip=clip, vae=vae, face_model=_NoFaceOnBlack(),
                             clip_vision=tiny_clip_vision, adapter=parts[0])
    settings = difp.DIFPSettings(steps=4, num_outputs=2, s_id=1.5, s_sty=0.0, style_source="none")
    with torch.inference_mode():
        delivery = contract.protect(photos, difp.METHOD, models, settings, resolution=128, receipt=False)
    (done,) = delivery.delivered
    (face,) = done.result.faces
    assert done.index == 0 and done.images.shape == (2, 128, 128, 3)
    assert (done.images - photos[0]).abs().amax() > 0.02                     # the face was regenerated
    assert isinstance(face.key, DIFPKey) and face.key.steps == 4 and face.report["outputs"] == 2
    assert [i for i, _ in delivery.failures] == [1] and "No face" in delivery.failures[0][1]
    with pytest.raises(ValueError, match="needs an identity adapter"):     # a missing model stops the run itself
        contract.protect(photos, difp.METHOD, contract.Models(model=model, clip=clip, vae=vae,
                                                              face_model=_NoFaceOnBlack()), settings, resolution=128)


def test_difp_settings_are_validated_when_built():
    from diffprivacy.methods import difp
    for bad, message in ((dict(strength=1.2), "beyond the last timestep"), (dict(steps=0), "steps must be"),
                         (dict(g_rea=1.5), "g_rea"), (dict(realism_mode="smooth"), "realism mode"),
                         (dict(donor="friend"), "donor must be"), (dict(donor="image"), "donor_image"),
                         (dict(s_id=float("nan")), "s_id holds NaN"),
                         (dict(style_source="another image"), "style_image")):
        with pytest.raises(ValueError, match=message):
            difp.DIFPSettings(**bad)
    off = difp.DIFPSettings(style_source="none", reference_source="none")
    assert off.s_sty == 0.0 and off.realism is False                         # the settings say what runs


class _TwoFaces:
    """A face model seeing a large face on the left and a small one on the right of any image; each face's
    embedding is the mean of its box (so which face was embedded shows)."""
    name, metric, threshold, differentiable = "two", "cosine", 0.4, True

    def detect(self, image):
        from diffprivacy.guidance.face.base import Face
        h, w = image.shape[:2]
        boxes = ((0.0, 0.2 * h, 0.5 * w, 0.8 * h), (0.7 * w, 0.4 * h, 0.9 * w, 0.6 * h))  # largest first
        return [Face(torch.tensor(b), torch.tensor([[b[0] + (b[2] - b[0]) * f, (b[1] + b[3]) / 2]
                                                    for f in (0.3, 0.7, 0.5, 0.35, 0.65)]), 0.9) for b in boxes]

    def embed(self, images, landmarks):
        return torch.nn.functional.normalize(landmarks.mean(1), dim=1)


def test_difp_in_a_face_crop_replaces_and_composites_the_face_the_crop_was_cut_around_not_a_larger_neighbour(
        monkeypatch):
    """A crop cut around a small face may also hold a larger neighbour: DIFP takes the identity of, and composites
    over, the crop's own face (its face mask), not the largest face in the crop."""
    from diffprivacy.methods import contract, difp
    from diffprivacy.methods.pipeline import Crop
    seen = {}

    def regenerate(model, vae, image, conditioning, settings, mask, reference):
        seen["mask"] = mask
        return difp.DIFPResult(image, image, torch.zeros(1, 4, 8, 8), torch.zeros(2), None)
    monkeypatch.setattr(difp, "regenerate", regenerate)
    image = torch.rand(1, 64, 64, 3)
    crop = Crop(0, 0, 64, (40, 20, 64, 44), 0, 1, (44.8, 25.6, 57.6, 38.4))   # cut around the small face
    settings = difp.DIFPSettings(steps=2, s_id=0.0, style_source="none")
    done = difp.protect_crop(contract.Models(face_model=_TwoFaces()), image, None, settings,
                             contract.CropJob(image, crop).face_mask())
    assert done.original_identity["landmarks"][0, :, 0].min() > 0.6 * 64           # the small face's identity
    assert seen["mask"][32, 58] > 0.9 and seen["mask"][32, 10] == 0                # composited over it alone
    largest = difp.protect_crop(contract.Models(face_model=_TwoFaces()), image, None, settings)
    assert largest.original_identity["landmarks"][0, :, 0].max() < 0.5 * 64        # without a mask: the largest
