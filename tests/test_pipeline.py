"""The face pipeline (methods/pipeline.py): crops around each face, the photo kept at its size, every pixel outside
the pasted masks the input's; whole frame letterboxed, never squashed; keys of face crops recover the whole photo."""
import pytest
import torch

from diffprivacy.guidance.face.base import Face
from diffprivacy.guidance.working_image import resize_for_training, working_mask
from diffprivacy.methods.pipeline import Plan, PipelineOptions, face_crop, plan_photo

GROUP = ("data", "photos", "group-6-faces.jpg")


class _Faces:
    """A detector returning fixed faces."""

    def __init__(self, *boxes):
        self.faces = [Face(torch.tensor(b, dtype=torch.float32), torch.zeros(5, 2), 0.9) for b in boxes]

    def detect(self, image):
        return list(self.faces)


def _photo(h=120, w=200, seed=0):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_a_crop_is_the_square_of_crop_factor_times_the_box_and_the_border_is_padded_never_stretched():
    photo = _photo()                                               # 200 x 120: its letterbox is y -40..160
    plan = plan_photo(photo, _Faces((90, 40, 110, 60), (60, 0, 80, 30), (0, 0, 20, 30), (40, 20, 140, 100)),
                      PipelineOptions(crop_factor=3.0), 64)
    middle, top, corner, large = plan.crops
    assert (middle.x, middle.y, middle.side) == (70, 20, 60)       # 3 x 20 around the box's centre (100, 50)
    assert (top.x, top.y, top.side) == (25, -30, 90)               # 3 x 30, running past the top border
    assert (corner.x, corner.y, corner.side) == (0, -30, 90)       # moved right into the letterbox square
    assert (large.x, large.y, large.side) == (0, -40, 200)         # at most the letterbox square, never more
    cut = plan.cut(photo)
    assert all(c.shape == (1, 64, 64, 3) for c in cut)
    at_size = Plan(plan.height, plan.width, 90, plan.mode, (top,)).cut(photo)[0][0]
    assert torch.equal(at_size[30:], photo[:60, 25:115])           # the photo's pixels, unscaled
    assert torch.equal(at_size[:30], photo[:1, 25:115].expand(30, -1, -1))  # padding repeats the edge row


def test_the_face_choice_is_the_one_select_faces_all_largest_indices_mask():
    faces = _Faces((10, 10, 30, 30), (100, 40, 150, 90), (160, 60, 180, 80))
    photo = _photo()
    assert [c.face_index for c in plan_photo(photo, faces, PipelineOptions(faces="largest"), 64).crops] == [1]
    assert [c.face_index for c in plan_photo(photo, faces, PipelineOptions(faces="indices", face_indices="0, 2"),
                                             64).crops] == [0, 2]
    mask = torch.zeros(120, 200)
    mask[50:90, 150:190] = 1
    assert [c.face_index for c in plan_photo(photo, faces, PipelineOptions(faces="mask", face_mask=mask),
                                             64).crops] == [2]
    with pytest.raises(ValueError, match="out of range"):
        plan_photo(photo, faces, PipelineOptions(faces="indices", face_indices="5"), 64)
    with pytest.raises(ValueError, match="crop_factor"):
        PipelineOptions(crop_factor=0.5).validated()


def test_pasting_keeps_the_photo_size_and_every_pixel_outside_the_masks_bit_identical(shared):
    from face_fixtures import dlib_model, load_photo
    photo = load_photo(shared(*GROUP), max_side=4000)
    assert photo.shape == (886, 1280, 3)
    plan = plan_photo(photo, dlib_model(), PipelineOptions(), 64)
    assert len(plan.crops) == 6
    changed = [torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    out = plan.paste(photo, changed)
    assert out.shape == (2, 886, 1280, 3)
    outside = plan.mask() == 0
    assert torch.equal(out[:, outside], photo[outside].expand(2, -1, -1))
    assert 0.02 < 1 - outside.float().mean() < 0.3                 # only the faces' regions may change ...
    inside = plan.mask() == 1
    assert (out[:, inside] - photo[inside]).abs().mean() > 0.1     # ... and there they do


class _SeenBy:
    """A face model that records the size of every image its detector is given."""

    def __init__(self, model):
        self.model, self.work_size, self.sizes = model, model.work_size, []

    def detect(self, image):
        self.sizes.append(tuple(image.shape[:2]))
        return self.model.detect(image)


def test_a_large_photo_is_detected_shrunk_to_the_detectors_size_and_finds_the_full_size_faces(shared):
    """dlib looks at a photo at 1600 px on its long side: a larger photo is shrunk to that before detection, and its
    faces (boxes, landmarks) come back in the photo's pixels where the full-size detection puts them, the group's
    smallest face (83 px at 1280) included."""
    import torch.nn.functional as F
    from face_fixtures import dlib_model, load_photo
    group = load_photo(shared(*GROUP), max_side=4000)
    group = F.interpolate(group.permute(2, 0, 1)[None], scale_factor=2.0, mode="bilinear")[0].permute(1, 2, 0)
    photos = [load_photo(shared("data", "photos", name), max_side=4000) for name in ("obama3.jpg", "biden.jpg")]
    for photo in photos + [group.clamp(0, 1)]:
        model = _SeenBy(dlib_model())
        full = model.model.detect(photo)
        plan = plan_photo(photo, model, PipelineOptions(), 128)
        assert max(photo.shape[:2]) > 2000 and model.sizes == [(round(photo.shape[0] * 1600 / max(photo.shape[:2])),
                                                                 round(photo.shape[1] * 1600 / max(photo.shape[:2])))]
        assert len(plan.crops) == len(full) >= 1
        for face in full:
            side = float(face.box[2] - face.box[0])
            near = min(plan.crops, key=lambda c: float((torch.tensor(c.face_box) - face.box).abs().max()))
            # measured: boxes within 0.8 px, landmarks (dlib's 68 points on the smaller copy) within 2.6 px
            assert (torch.tensor(near.face_box) - face.box).abs().max() <= 1 + 0.01 * side, (near.face_box, face.box)
            assert (torch.tensor(near.landmarks) - face.landmarks).abs().max() <= 1 + 0.02 * side
    assert len(full) == 6


def test_a_crops_known_landmarks_land_on_the_same_pixels_of_the_crop_at_the_working_resolution():
    """Where a face's landmarks sit in the photo, there they sit in its crop at the working resolution (a method
    given them need not detect the face again): bright dots at each landmark, found again in the cut crop."""
    photo = torch.zeros(120, 200, 3)
    points = [(93, 45), (106, 45), (100, 50), (95, 55), (105, 56)]
    for x, y in points:
        photo[y - 1:y + 2, x - 1:x + 2] = 1.0                      # a 3x3 dot centred on pixel (x, y)
    face = Face(torch.tensor([90.0, 40.0, 110.0, 60.0]), torch.tensor(points, dtype=torch.float32), 0.9)
    detector = _Faces()
    detector.faces = [face]
    plan = plan_photo(photo, detector, PipelineOptions(crop_factor=3.0), 96)
    crop = plan.crops[0]
    cut = plan.cut(photo)[0][0].mean(-1)                           # 60 px square at 96: dots 4.8 px wide
    mapped = crop.working_landmarks(96)
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    for (mx, my) in mapped.tolist():
        window = (xs - mx).abs().le(4) & (ys - my).abs().le(4)
        w = cut * window
        assert abs(float((w * xs).sum() / w.sum()) - mx) < 0.1 and abs(float((w * ys).sum() / w.sum()) - my) < 0.1
    whole = plan_photo(photo, detector, PipelineOptions(mode="whole frame"), 96).crops[0]
    assert whole.working_landmarks(96) is None and Plan.from_dict(plan.as_dict()).crops[0].working_landmarks(96) is None


def test_the_pasted_mask_is_feathered_over_feather_pixels_and_zero_outside_the_grown_box():
    face = Face(torch.tensor([40.0, 40, 60, 60]), torch.zeros(5, 2), 0.9)
    crop = face_crop(face, 0, 100, 100, PipelineOptions(feather=5, mask_grow=1.5).validated())
    assert crop.mask_box == (35, 35, 65, 65)
    m = crop.photo_mask(100, 100)
    assert m[50, 50] == 1 and m[50, 34] == 0 and m[50, 65] == 0
    assert torch.allclose(m[50, 35:40], torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))


def test_whole_frame_is_letterboxed_not_squashed_and_comes_back_at_the_photo_size():
    photo = torch.zeros(60, 120, 3)
    photo[20:40, 50:70] = 1.0                                      # a white square in a 2:1 photo
    work = resize_for_training(photo[None], 64)[0]
    assert work.shape == (64, 64, 3)
    cols, rows = (work[..., 0] > 0.5).any(0).sum(), (work[..., 0] > 0.5).any(1).sum()
    assert abs(int(cols) - int(rows)) <= 1                         # still a square (a squash makes it 2:1 tall)
    plan = plan_photo(photo, None, PipelineOptions(mode="whole frame"), 64)
    (crop,) = plan.crops
    assert (crop.x, crop.y, crop.side) == (0, -30, 120)
    back = plan.paste(photo, plan.cut(photo))[0]
    assert back.shape == photo.shape and (back - photo).abs().mean() < 0.03
    mask = torch.zeros(60, 120)
    mask[20:40, 50:70] = 1
    assert torch.allclose(working_mask(mask, 0, (64, 64)), work[..., 0], atol=0.05)  # the MASK follows the image


def test_a_plan_survives_its_json_and_a_plan_of_another_version_is_refused_by_name():
    plan = plan_photo(_photo(), _Faces((90, 40, 110, 60)), PipelineOptions(), 64)
    again = Plan.from_json(plan.to_json())
    assert again.as_dict() == plan.as_dict() and torch.equal(again.mask(), plan.mask())
    with pytest.raises(ValueError, match="version 7"):
        Plan.from_dict({**plan.as_dict(), "version": 7})


# -- through the nodes, with the tiny checkpoint -----------------------------------------------------------------

@pytest.fixture(scope="module")
def group(shared):
    from face_fixtures import load_photo
    return load_photo(shared(*GROUP), max_side=4000)[None]


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    model, clip, vae = tiny_sd
    with torch.inference_mode():
        key_e = [[torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(f"a face, stage {i}"))[0][0]
                             for i in range(10)]), {}]]
        uc = [clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]]
    return model, clip, vae, key_e, uc


@pytest.fixture(scope="module")
def anonymized(tiny, group):
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyAnonymize
    from toy_models import PhotoToyFaceModel
    model, clip, vae, key_e, uc = tiny

    class Recording(PhotoToyFaceModel):
        """Records the size of every image it is asked to detect faces in."""
        sizes: list = []

        def detect(self, image):
            self.sizes.append(tuple(image.shape[:2]))
            return super().detect(image)

    face_model = Recording()
    with torch.inference_mode():
        out = DiffPrivacyAnonymize().anonymize(model, vae, face_model, group, key_e, uc, 1, 4, 0.5, 0.4, 1, 1.0,
                                               1.0, resolution=64)
    return face_model, out


def _outside_identical(delivered, photo, plans):
    outside = plans[0].mask() == 0
    return torch.equal(delivered[:, outside], photo[0][outside].expand(delivered.shape[0], -1, -1))


def test_anonymize_protects_each_face_of_a_group_photo_at_its_size_with_a_receipt(anonymized, group):
    import json
    _, out = anonymized
    images, plans, receipt = out["result"][0], out["result"][8], json.loads(out["result"][9])
    assert images.shape == (1, 886, 1280, 3)
    assert _outside_identical(images, group, plans)
    assert not torch.equal(images, group)
    assert out["result"][5].shape == (6, 64, 64, 3)                # originals: the six crops Key-I inverts
    faces = receipt["outputs"][0]["faces"]
    assert receipt["recognizer"] == "dlib-resnet128" and receipt["guided_by"] == "toy"
    assert sorted(f["crop_size"] for f in faces) == sorted(c.side for c in plans[0].crops)
    assert all(f["working_resolution"] == 64 and f["verdict"] in ("still recognised", "not recognised")
               for f in faces)
    assert any("crop" in line for line in out["ui"]["text"])


def test_anonymize_detects_the_faces_once_on_the_photo_and_never_again_in_a_crop(anonymized):
    """The crop path's one detection is the photo's: each crop's guidance starts from the landmarks it found
    (mapped into the crop), not from a detection in the crop."""
    face_model, _ = anonymized
    assert face_model.sizes == [(886, 1280)]


def test_hide_keeps_the_photo_size_and_the_pixels_outside_the_masks_and_its_key_recovers_the_photo(tiny, group):
    import json
    from diffprivacy.nodes.encrypt_nodes import DiffPrivacyHide
    from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI, DiffPrivacyRecover
    from toy_models import PhotoToyFaceModel
    model, clip, vae, key_e, uc = tiny
    face_model = PhotoToyFaceModel()  # outside inference mode, as a loader node's model is thawed for autograd
    with torch.inference_mode():
        out = DiffPrivacyHide().hide(model, vae, face_model, group, key_e, uc, 1, 4, 0.5, 0.6, 1, 1.0, 1.0,
                                     redetect_every=0, resolution=64, faces="indices", face_indices="0, 1")
        images, originals, key_es, plans = (out["result"][i] for i in (0, 5, 6, 8))
        (key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, key_es, vae, originals, 4, resolution=64, crops=plans)
        _, photo = DiffPrivacyRecover().recover(model, key_es[:1], key_i, 4, vae=vae, protected=images)  # one Key-E
    assert images.shape == (1, 886, 1280, 3) and len(plans[0].crops) == 2
    assert _outside_identical(images, group, plans)
    assert len(json.loads(out["result"][9])["outputs"][0]["faces"]) == 2
    assert photo.shape == (1, 886, 1280, 3) and _outside_identical(photo, group, plans)


def test_a_face_crop_key_recovers_the_whole_photo_outside_the_masks_bit_identical(tiny, group, anonymized,
                                                                                   tmp_path):
    import folder_paths
    from diffprivacy.nodes.key_nodes import DiffPrivacyLoadKey, DiffPrivacySaveKey
    from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI, DiffPrivacyRecover
    model, clip, vae, key_e, uc = tiny
    _, out = anonymized
    protected, originals, key_es, plans = out["result"][0], out["result"][5], out["result"][6], out["result"][8]
    steps = 10
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        with torch.inference_mode():
            (key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, key_es, vae, originals, steps, resolution=64,
                                                        crops=plans)
            (from_photo,) = DiffPrivacyMakeKeyI().make_key_i(model, key_es, vae, group, steps, crops=plans)
            assert torch.equal(from_photo["samples"], key_i["samples"])  # the photo is cut as protection cut it
            saved = DiffPrivacySaveKey().save(key_i, key_es, model, clip, steps, 0.4, 0.5, "diffprivacy/k", "")
            path = saved["result"][0]
            assert "\n" not in path                                # one key file for the photo's six crops
            from safetensors import safe_open
            with safe_open(path, "pt") as f:                       # readers of version 1 refuse it by version
                assert f.metadata()["format_version"] == "2"
            ki, ke, *_ = DiffPrivacyLoadKey().load("", "", key_path=path)
            assert ki["samples"].shape[0] == 6
            with pytest.raises(ValueError, match="protected photo"):
                DiffPrivacyRecover().recover(model, ke, ki, steps, vae=vae)  # vae without the protected photo
            latent, photo = DiffPrivacyRecover().recover(model, ke, ki, steps, vae=vae, protected=protected)
    finally:
        folder_paths.set_output_directory(old)
    plan = plans[0]
    assert photo.shape == (1, 886, 1280, 3)
    outside = plan.mask() == 0
    assert torch.equal(photo[0][outside], group[0][outside])      # the rest as the protected photo has it
    # inside: the recovered faces, within Key-I's recovery error at the crop level
    with torch.inference_mode():
        crops_rec = vae.decode(latent["samples"])
    crop_error = float((crops_rec - originals).abs().mean())
    reference = plan.paste(group[0], [c for c in plan.cut(group[0])])[0]  # the original through the crop round trip
    inside = plan.mask() == 1
    photo_error = float((photo[0][inside] - reference[inside]).abs().mean())
    assert photo_error < 1.5 * crop_error + 0.01, (photo_error, crop_error)
    with torch.inference_mode():                                   # Key-I's recovery error, in latent space
        target = vae.encode(originals)
    recovered_error = float((latent["samples"] - target).pow(2).mean().sqrt())
    protected_error = float((out["result"][1]["samples"] - target).pow(2).mean().sqrt())
    assert recovered_error < 0.4 * float(target.std()) and recovered_error < 0.5 * protected_error, (
        recovered_error, protected_error)


def test_keys_written_before_face_crops_still_load_as_whole_frame_keys(tiny, tmp_path):
    from diffprivacy.inversion.key_bundle import bundle_from_tensors, crop_plans
    from diffprivacy.inversion.keyfile import key_bundle_metadata, read_key_file, write_key_file
    model, clip, vae, key_e, uc = tiny
    from diffprivacy.inversion.key_e import KeyE
    tensors = {"key_i": torch.randn(1, 4, 8, 8), **KeyE.from_conditioning(key_e, allow_text=False).to_tensors()}
    meta = key_bundle_metadata(steps=10, tau=0.4, strength=0.6, image_width=64, image_height=64,
                               model_fingerprint="m", clip_fingerprint="c")
    path = write_key_file(tmp_path / "old.safetensors", tensors, meta)
    got, metadata = read_key_file(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format_version"] == "1"               # what every key before face crops holds
    latent, _ = bundle_from_tensors(got, metadata)
    assert crop_plans(latent) is None and latent["samples"].shape == (1, 4, 8, 8)


def test_hide_from_detectors_keeps_the_group_photo_and_its_pixels_outside_the_faces_with_a_receipt(group):
    import json
    from diffprivacy.methods.pipeline import full_size_plan
    from diffprivacy.nodes.detector_nodes import DiffPrivacyHideFromDetectors
    with torch.inference_mode():
        out = DiffPrivacyHideFromDetectors().hide(group, detectors="mtcnn", private_faces="indices",
                                                  face_indices="0, 1", range_rp=2.0, epsilon=1.0, iterations=1,
                                                  robust=False, max_megapixels=12.0)
    image, report = out["result"][0], json.loads(out["result"][2])[0]
    receipt = json.loads(out["result"][3])
    faces = [Face(torch.tensor(b), torch.zeros(5, 2), 1.0) for b in report["boxes"]]  # the attack's faces
    plan = full_size_plan(faces, report["private"], 886, 1280)
    outside = plan.mask() == 0
    assert image.shape == (1, 886, 1280, 3) and torch.equal(image[0][outside], group[0][outside])
    assert [f["face"] for f in receipt["outputs"][0]["faces"]] == report["private"] == [0, 1]
    assert all(f["working_resolution"] == "full size" for f in receipt["outputs"][0]["faces"])
