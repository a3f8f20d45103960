"""Bad input in a live server: no face, several faces, RGBA / grayscale / odd-sized images, corrupted key files.

Each case runs the shipped anonymize-text-key or recover workflow, shrunk in the API prompt only (a small
input image, the shared working resolution at 64 or 0, S = 4, one output). A bad input must end in an
execution error that says what is wrong, save nothing, leave the files it was given as they were, and leave
the server serving.

Then the hostile-user cases of issue 25, all on the same server: NaN / infinity typed into a number list, in a
weight file's tensor, in an IMAGE made by a stock node, in a De-ID pool and in a key; a pickle and an empty adapter
file; a key too large or inconsistent (refused within seconds); a DIFP key given to Load Key; a DIFP Guider on a
MODEL without streams; a realism reference of the wrong size; a damaged insightface pack under Face Model Loader
auto; and Cancel, which must stop Recover, Hide from Detectors, FSAP and De-ID within one step.
"""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, nodes_of
from face_fixtures import small_face_image
from comfy_server import execution_error
from workflow_helpers import only, saved_key

STEPS = 4


def _anonymize(workflow_api, image: str, resolution: int = 64, seed: int = 0) -> dict:
    """anonymize-text-key on input/<image> at the given working resolution, S = STEPS, one output."""
    api = workflow_api("anonymize-text-key")
    nodes_of(api, "LoadImage")[0]["inputs"]["image"] = image
    task = nodes_of(api, "DiffPrivacyAnonymize")[0]["inputs"]
    task.update(num_outputs=1, seed=seed)
    for nid, node in api.items():
        if node["class_type"] == "PrimitiveInt":
            node["inputs"]["value"] = resolution if [nid, 0] == task["resolution"] else STEPS
    return api


def _put(comfy_server, name: str, image: Image.Image) -> str:
    image.save(comfy_server.base / "input" / name)
    return name


def _protected(comfy_server, entry, api) -> list[Image.Image]:
    pngs = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    return [Image.open(io.BytesIO(p)) for p in pngs]


def _face(size=(96, 96)) -> Image.Image:
    return small_face_image(SHARED / "data" / "photos" / "obama.jpg", 256).resize(size, Image.LANCZOS)


def _gray() -> Image.Image:
    return Image.new("RGB", (96, 96), (128, 128, 128))


def _landscape() -> Image.Image:
    """Sky fading to a horizon, green ground below: an outdoor photo's layout, no face."""
    y = np.linspace(0.0, 1.0, 96)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 230]) + y * np.array([220, 230, 240])
    ground = np.array([60, 120, 40]) + 30 * np.sin(np.linspace(0, 12, 96))[None, :, None]
    pixels = np.where(y < 0.55, sky, ground) * np.ones((96, 96, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("make", [_gray, _landscape], ids=["flat-gray", "landscape"])
def test_an_image_without_a_face_is_refused_with_a_clear_error(comfy_server, workflow_api, make):
    api = _anonymize(workflow_api, _put(comfy_server, f"noface-{make.__name__}.png", make()))
    keys = comfy_server.base / "output" / "diffprivacy"
    keys_before = sorted(keys.glob("key_*.safetensors"))
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = execution_error(entry)
    assert error["node_type"] == "DiffPrivacyAnonymize", error
    message = error["exception_message"].lower()
    assert "no face was detected in image 0" in message, message
    assert not _protected(comfy_server, entry, api)
    # Save Key waits for the protected images: a failed protection leaves no key behind
    assert sorted(keys.glob("key_*.safetensors")) == keys_before
    assert comfy_server.alive()


def test_a_group_photo_is_protected_in_one_run(comfy_server, workflow_api):
    """A group photo runs through the shipped workflow in one run, every detected face steered (faces = all, the
    default; tests/test_group_guidance.py checks that each face receives gradient)."""
    group = Image.open(SHARED / "data" / "photos" / "group-6-faces.jpg").convert("RGB").resize((320, 224))
    api = _anonymize(workflow_api, _put(comfy_server, "group.png", group), resolution=0)
    face_model = [only(api, "DiffPrivacyFaceModelLoader"), 0]
    api["9101"] = {"class_type": "DiffPrivacyFaceAnalyze", "inputs": {
        "face_model": face_model, "image": [only(api, "LoadImage"), 0], "face": "all", "face_index": 0,
        "if_no_face": "error"}}
    api["9102"] = {"class_type": "PreviewImage", "inputs": {"images": ["9101", 1]}}  # one crop per face
    entry = comfy_server.run(api, timeout=180)
    assert len(comfy_server.output_images(entry, "9102")) >= 2  # several faces really are found at this size
    (protected,) = _protected(comfy_server, entry, api)
    assert protected.size == (320, 224)
    assert api[only(api, "DiffPrivacyAnonymize")]["inputs"].get("faces", "all") == "all"


def _rgba() -> Image.Image:
    face = _face().convert("RGBA")
    face.putalpha(Image.linear_gradient("L").resize(face.size))  # transparent at the top, opaque at the bottom
    return face


@pytest.mark.parametrize("make, mode, resolution, size", [
    (_rgba, "RGBA", 64, (96, 96)),                    # the photo keeps its size: its face crop works at 64
    (lambda: _face().convert("L"), "L", 64, (96, 96)),
    (lambda: _face((97, 131)), "RGB", 0, (97, 131)),  # 0: the crop at its own size (a multiple of 8)
], ids=["rgba", "grayscale", "odd-size"])
def test_rgba_grayscale_and_odd_sized_images_are_protected(comfy_server, workflow_api, make, mode, resolution, size):
    image = make()
    assert image.mode == mode
    name = _put(comfy_server, f"face-{mode}-{image.width}x{image.height}.png", image)
    api = _anonymize(workflow_api, name, resolution=resolution)
    entry = comfy_server.run(api, timeout=120)
    (protected,) = _protected(comfy_server, entry, api)
    assert protected.size == size and protected.mode == "RGB"
    assert (comfy_server.base / "output" / saved_key(entry, api)).is_file()


@pytest.fixture(scope="module")
def real_key(comfy_server, workflow_api):
    """A key file written by a normal anonymize-text-key run (relative to the output folder)."""
    _put(comfy_server, "face-64.png", _face((64, 64)))
    api = _anonymize(workflow_api, "face-64.png")
    entry = comfy_server.run(api, timeout=120)
    (png,) = comfy_server.output_images(entry, only(api, "DiffPrivacySaveImageClean"))
    (comfy_server.base / "input" / "protected.png").write_bytes(png)  # the recover workflow pastes into it
    return saved_key(entry, api)


def _recover(workflow_api, **load):
    api = workflow_api("recover")
    nodes_of(api, "DiffPrivacyLoadKey")[0]["inputs"].update(load)
    return api


def test_a_corrupted_key_file_is_refused_naming_the_file_and_nothing_is_lost(comfy_server, workflow_api, real_key):
    folder = comfy_server.base / "output" / "diffprivacy"
    good = comfy_server.base / "output" / real_key
    data = good.read_bytes()
    truncated = folder / "truncated_00001_.safetensors"
    truncated.write_bytes(data[:len(data) // 2])
    garbage = folder / "garbage_00001_.safetensors"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))

    for load in ({"key_path": f"diffprivacy/{truncated.name}"}, {"key_file": garbage.name}):
        before = {p: p.read_bytes() for p in (good, truncated, garbage)}
        api = _recover(workflow_api, **load)
        entry = comfy_server.run(api, timeout=120, expect_error=True)
        error = execution_error(entry)
        assert error["node_type"] == "DiffPrivacyLoadKey", error
        name = (truncated if "key_path" in load else garbage).name
        assert name in error["exception_message"] and "key file" in error["exception_message"], error
        assert not comfy_server.output_images(entry)
        assert {p: p.read_bytes() for p in before} == before  # nothing deleted or rewritten

    entry = comfy_server.run(_recover(workflow_api, key_path=real_key), timeout=120)
    (png,) = comfy_server.output_images(entry)
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_after_all_the_bad_input_the_server_still_protects_a_photo(comfy_server, workflow_api, real_key):
    api = _anonymize(workflow_api, "face-64.png", seed=1)  # a new seed: run again, not answered from the cache
    entry = comfy_server.run(api, timeout=120)
    (protected,) = _protected(comfy_server, entry, api)
    assert protected.size == (64, 64)
    assert comfy_server.alive()


def test_a_nan_setting_posted_through_the_api_fails_naming_it_and_saves_no_key(comfy_server, workflow_api):
    """ComfyUI's min/max checks let NaN through and its API accepts NaN in JSON: it used to give a "successful" run
    with a black image and a saved key."""
    api = _anonymize(workflow_api, _put(comfy_server, "nan-face.png", _face()))
    api[only(api, "DiffPrivacyAnonymize")]["inputs"]["diversity_weight"] = float("nan")
    keys = comfy_server.base / "output" / "diffprivacy"
    keys_before = sorted(keys.glob("key_*.safetensors"))
    entry = comfy_server.run(api, timeout=120, expect_error=True)
    error = execution_error(entry)
    assert error["node_type"] == "DiffPrivacyAnonymize", error
    assert "diversity_weight is nan" in error["exception_message"], error
    assert not _protected(comfy_server, entry, api)
    assert sorted(keys.glob("key_*.safetensors")) == keys_before
    assert comfy_server.alive()


# -- numbers, files and keys that must be refused where they enter (issue 25) ----------------------------------------
# Every case posts a prompt to the one session server, asserts the error (node and words) or the warning, and then
# runs a valid prompt of the same kind (a new seed or input, so it really runs rather than being answered from the
# cache).

def _refused(comfy_server, api, node_type: str, *texts: str) -> str:
    entry = comfy_server.run(api, timeout=300, expect_error=True)
    error = execution_error(entry)
    assert error["node_type"] == node_type, error
    message = error["exception_message"]
    for text in texts:
        assert text in message, message
    # no raw torch text reaches the user, and never the advice to turn off the safe loader
    assert "weights_only" not in message and "expanded size" not in message and "argmin" not in message, message
    assert comfy_server.alive()
    return message


@pytest.fixture(scope="module")
def adapters(comfy_server, tiny_sd, tiny_clip_vision, tmp_path_factory):
    """A FaceID adapter (tiny shapes) under its released name, and three bad ones: a NaN tensor, a pickle that needs
    code to load, an empty file; the tiny ArcFace in buffalo_l; donor.png."""
    import fractions

    import ip_adapter_fixtures as fx
    import torch
    d = tmp_path_factory.mktemp("bad_adapters")
    shape = fx.tiny_shape(tiny_sd[0], tiny_clip_vision)
    comfy_server.put_model("ipadapter", "ip-adapter-faceid_sd15.bin",
                           fx.write_adapter(d / "ip-adapter-faceid_sd15.bin", "faceid", **shape))
    comfy_server.put_model("insightface/models/buffalo_l", "w600k_r50.onnx",
                           fx.export_arcface_onnx(d / "buffalo_l" / "w600k_r50.onnx"))
    groups = fx.adapter_state_dict("faceid", **shape)
    poisoned = sorted(groups["image_proj"])[0]
    groups["image_proj"][poisoned] = groups["image_proj"][poisoned].clone().fill_(float("nan"))
    torch.save(groups, d / "nan-faceid_sd15.bin")
    torch.save({"image_proj": {"w": fractions.Fraction(1, 3)}}, d / "pickled-faceid_sd15.bin")  # needs code to load
    (d / "empty-faceid_sd15.bin").write_bytes(b"")
    for name in ("nan-faceid_sd15.bin", "pickled-faceid_sd15.bin", "empty-faceid_sd15.bin"):
        comfy_server.put_model("ipadapter", name, d / name)
    small_face_image(SHARED / "data" / "photos" / "biden.jpg", 128).save(comfy_server.base / "input" / "donor.png")
    return {"poisoned": f"image_proj.{poisoned}"}


def _identity(workflow_api, seed: int = 0, **streams) -> dict:
    """identity-from-donor at 64 px, 2 steps, without the LoRA."""
    api = workflow_api("identity-from-donor")
    load = [nid for nid, n in api.items() if n["class_type"] == "LoadImage" and n["inputs"]["image"] == "face.png"][0]
    api["9001"] = {"class_type": "ImageScale", "inputs": {"image": [load, 0], "upscale_method": "area",
                                                          "width": 64, "height": 64, "crop": "center"}}
    api[only(api, "VAEEncode")]["inputs"]["pixels"] = ["9001", 0]
    api[only(api, "KSampler")]["inputs"].update(steps=2, seed=seed)
    api[only(api, "DiffPrivacyIdentityAdapterLoader")]["inputs"]["lora_name"] = "none"
    api[only(api, "DiffPrivacyApplyIdentityStreams")]["inputs"].update(streams)
    return api


def test_nan_or_infinite_layer_weights_are_refused_naming_the_input(comfy_server, workflow_api, adapters):
    for text in ("nan, 1, 1", "1, inf, 1", "1, -inf"):
        message = _refused(comfy_server, _identity(workflow_api, layer_weights=text),
                           "DiffPrivacyApplyIdentityStreams", "layer_weights holds NaN or infinity")
        assert "numbers separated by commas" in message
    entry = comfy_server.run(_identity(workflow_api, seed=1), timeout=300)
    assert comfy_server.output_images(entry)


def test_a_nan_tensor_a_pickle_and_an_empty_adapter_file_are_refused_naming_file_and_tensor(comfy_server,
                                                                                         workflow_api, adapters):
    def with_adapter(name):
        api = _identity(workflow_api)
        api[only(api, "DiffPrivacyIdentityAdapterLoader")]["inputs"]["adapter_name"] = name
        return api

    _refused(comfy_server, with_adapter("nan-faceid_sd15.bin"), "DiffPrivacyIdentityAdapterLoader",
             "nan-faceid_sd15.bin", f"tensor '{adapters['poisoned']}' holds NaN or infinity", "download")
    message = _refused(comfy_server, with_adapter("pickled-faceid_sd15.bin"), "DiffPrivacyIdentityAdapterLoader",
                       "pickled-faceid_sd15.bin is not a plain tensor file", "never run", ".safetensors")
    assert "False" not in message
    _refused(comfy_server, with_adapter("empty-faceid_sd15.bin"), "DiffPrivacyIdentityAdapterLoader",
             "empty-faceid_sd15.bin is empty (0 bytes)")
    entry = comfy_server.run(_identity(workflow_api, seed=2), timeout=300)
    assert comfy_server.output_images(entry)


def _nan_image(api, load: str) -> list:
    """A stock node turning the loaded image into NaN (ImageBlend with a NaN factor, which ComfyUI's range check
    lets through): what a hostile or broken upstream node delivers."""
    api["9101"] = {"class_type": "ImageBlend", "inputs": {"image1": [load, 0], "image2": [load, 0],
                                                          "blend_factor": float("nan"), "blend_mode": "normal"}}
    return ["9101", 0]


def test_a_nan_image_is_refused_by_hide_from_detectors_and_by_the_clean_saver(comfy_server, workflow_api):
    api = workflow_api("hide-from-detectors")
    api[only(api, "DiffPrivacyHideFromDetectors")]["inputs"].update(iterations=1, image=_nan_image(
        api, only(api, "LoadImage")))
    _refused(comfy_server, api, "DiffPrivacyHideFromDetectors", "the IMAGE input image holds NaN or infinity",
             "check its settings")
    api = workflow_api("hide-from-detectors")
    hide = only(api, "DiffPrivacyHideFromDetectors")
    api = {nid: n for nid, n in api.items() if nid != hide and n["class_type"] == "LoadImage"}
    api["9102"] = {"class_type": "DiffPrivacySaveImageClean", "inputs": {
        "images": _nan_image(api, only(api, "LoadImage")), "filename_prefix": "diffprivacy/nan"}}
    _refused(comfy_server, api, "DiffPrivacySaveImageClean", "the IMAGE input images holds NaN or infinity")
    assert not list((comfy_server.base / "output" / "diffprivacy").glob("nan_*.png"))
    api = workflow_api("hide-from-detectors")
    api[only(api, "DiffPrivacyHideFromDetectors")]["inputs"].update(iterations=1, range_rp=11.5)
    entry = comfy_server.run(api, timeout=300)
    assert comfy_server.output_images(entry)


def _sample(model: list, guider_or_sampler: dict, latent_size: int = 64) -> dict:
    """Checkpoint -> SamplerCustom(Advanced) with the given GUIDER or SAMPLER node -> VAE Decode -> Preview."""
    api = {
        "9201": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "9202": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["9201", 1]}},
        "9203": {"class_type": "EmptyLatentImage", "inputs": {"width": latent_size, "height": latent_size,
                                                              "batch_size": 1}},
        "9204": {"class_type": "BasicScheduler", "inputs": {"model": ["9201", 0], "scheduler": "normal", "steps": 2,
                                                            "denoise": 1.0}},
        "9206": {"class_type": "VAEDecode", "inputs": {"samples": ["9205", 0], "vae": ["9201", 2]}},
        "9207": {"class_type": "PreviewImage", "inputs": {"images": ["9206", 0]}},
    }
    model = model or ["9201", 0]
    if guider_or_sampler["class_type"] == "DiffPrivacyDIFPGuider":
        guider_or_sampler["inputs"].update(model=model, conditioning=["9202", 0])
        api["9208"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}}
        api["9209"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        api["9205"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["9208", 0], "guider": ["9210", 0], "sampler": ["9209", 0], "sigmas": ["9204", 0],
            "latent_image": ["9203", 0]}}
    else:
        guider_or_sampler["inputs"].update(model=model, vae=["9201", 2])
        api["9205"] = {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": 0, "cfg": 1.0, "positive": ["9202", 0],
            "negative": ["9202", 0], "sampler": ["9210", 0], "sigmas": ["9204", 0], "latent_image": ["9203", 0]}}
    api["9210"] = guider_or_sampler
    return api


def test_the_difp_guider_refuses_a_model_without_streams_and_warns_on_a_scale_without_its_stream(
        comfy_server, workflow_api, adapters):
    guider = {"class_type": "DiffPrivacyDIFPGuider", "inputs": {"s_id": 1.0, "s_sty": 1.0}}
    _refused(comfy_server, _sample(None, guider), "DiffPrivacyDIFPGuider", "carries no identity or style streams",
             "Apply Identity Streams")
    # identity streams only, s_sty left at its default: runs, and the node says s_sty does nothing
    api = _identity(workflow_api)
    api = {nid: n for nid, n in api.items() if n["class_type"] not in ("DiffPrivacySaveImageClean",)}
    api.update(_sample([only(api, "DiffPrivacyApplyIdentityStreams"), 0],
                       {"class_type": "DiffPrivacyDIFPGuider", "inputs": {"s_id": 1.0, "s_sty": 1.0}}))
    entry = comfy_server.run(api, timeout=300)
    (note,) = entry["outputs"]["9210"]["text"]
    assert "no style stream, so s_sty = 1 has no effect" in note and "set s_sty to 0" in note, note
    assert comfy_server.output_images(entry, "9207")


def test_a_realism_reference_of_another_size_than_the_latent_is_refused_in_pixels(comfy_server):
    def sampler(reference):
        return {"class_type": "DiffPrivacyRealismDDIMSampler", "inputs": {
            "reference": reference, "g_rea": 0.6, "mode": "fixed", "k": 0.0, "stop_at": 1.0, "space": "latent",
            "seed": 0}}

    api = _sample(None, sampler(["9211", 0]))
    api["9211"] = {"class_type": "LoadImage", "inputs": {"image": "face.png"}}  # 256 x 256
    _refused(comfy_server, api, "SamplerCustom", "the reference image is 256x256 pixels but the image being "
             "sampled is 64x64", "Upscale Image")
    api["9212"] = {"class_type": "ImageScale", "inputs": {"image": ["9211", 0], "upscale_method": "area",
                                                          "width": 64, "height": 64, "crop": "center"}}
    api["9210"]["inputs"]["reference"] = ["9212", 0]
    assert comfy_server.output_images(comfy_server.run(api, timeout=300), "9207")


@pytest.fixture(scope="module")
def pools(comfy_server, tiny_clip_vision, adapters):
    """De-ID pool files in output/deid/: a good one (3 fakes at 64 px), one with NaN appearance embeddings, one with
    NaN identities, an empty one."""
    import torch

    from diffprivacy.methods import diffusion_deid as deid
    with torch.no_grad():
        width = deid.Appearance(tiny_clip_vision)(torch.rand(1, 3, 64, 64))[0].shape[-1]
    g = torch.Generator().manual_seed(0)

    def pool(k=3, **override):
        tensors = dict(identity=torch.nn.functional.normalize(torch.randn(k, 512, generator=g), dim=1),
                       appearance=torch.randn(k, width, generator=g), latents=torch.randn(k, 4, 8, 8, generator=g),
                       recognizer=torch.randn(k, 512, generator=g), has_face=torch.ones(k, dtype=torch.bool))
        tensors.update({name: tensors[name].clone().fill_(value) for name, value in override.items()})
        return deid.Pool(**tensors, meta={"resolution": 64})

    folder = comfy_server.base / "output" / "deid"
    folder.mkdir(exist_ok=True)
    made = {"good": pool(), "nan-appearance": pool(appearance=float("nan")),
            "nan-identity": pool(identity=float("nan")), "empty": pool(k=0)}
    for name, p in made.items():
        p.save(folder / f"{name}.pool.safetensors")
    return {name: f"deid/{name}.pool.safetensors" for name in made}


def _deid(pool_path: str, steps: int = 2, iterations: int = 1, prompt: str = "a photo of a person") -> dict:
    return {
        "9301": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "9302": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip-vit-large-patch14.safetensors"}},
        "9303": {"class_type": "DiffPrivacyIdentityAdapterLoader", "inputs": {
            "adapter_name": "ip-adapter-faceid_sd15.bin", "lora_name": "none", "lora_strength": 1.0}},
        "9304": {"class_type": "DiffPrivacyFaceModelLoader", "inputs": {
            "detector": "mtcnn", "recognizer": "facenet-casia", "insightface_pack": "auto", "threshold": 0.0,
            "device": "auto"}},
        "9305": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "9306": {"class_type": "DiffPrivacyDiffusionDeID", "inputs": {
            "model": ["9301", 0], "vae": ["9301", 2], "clip": ["9301", 1], "clip_vision": ["9302", 0],
            "identity_adapter": ["9303", 0], "face_model": ["9304", 0], "image": ["9305", 0], "pool_path": pool_path,
            "prompt": prompt, "objective": "iis", "x_t": "real", "iterations": iterations, "lambda_att": 1.0,
            "steps": steps, "resolution": 64}},
        "9307": {"class_type": "PreviewImage", "inputs": {"images": ["9306", 0]}},
        "9308": {"class_type": "PreviewAny", "inputs": {"source": ["9306", 1]}},
    }


def test_de_id_pools_with_nan_or_no_fakes_are_refused_and_two_steps_run(comfy_server, pools):
    _refused(comfy_server, _deid(pools["nan-appearance"]), "DiffPrivacyDiffusionDeID",
             "nan-appearance.pool.safetensors: tensor 'appearance' holds NaN or infinity", "build the pool again")
    _refused(comfy_server, _deid(pools["nan-identity"]), "DiffPrivacyDiffusionDeID",
             "tensor 'identity' holds NaN or infinity")
    _refused(comfy_server, _deid(pools["empty"]), "DiffPrivacyDiffusionDeID", "holds no fakes",
             "build the pool again")
    for steps in (2, 3):  # the widget allows 2: the render walks at most the steps there are
        entry = comfy_server.run(_deid(pools["good"], steps=steps), timeout=300)
        (report,) = entry["outputs"]["9308"]["text"]
        assert "paired with fake" in report and "nan" not in report, report


def _write_key(path, tensors: dict, metadata: dict):
    from diffprivacy.inversion.keyfile import write_key_file
    write_key_file(path, tensors, metadata)  # unsealed, with a valid checksum: only the contents are wrong
    return f"diffprivacy/{path.name}"


def test_an_oversized_or_inconsistent_key_and_a_difp_key_are_refused_by_load_key_within_seconds(
        comfy_server, workflow_api, real_key):
    import time

    import torch

    from diffprivacy.methods.difp_keys import DIFPKey, write_difp_key
    from diffprivacy.inversion.key_check import key_i_latent
    from diffprivacy.inversion.keyfile import KEY_I, read_key_file
    folder = comfy_server.base / "output" / "diffprivacy"
    tensors, metadata = read_key_file(comfy_server.base / "output" / real_key)
    huge = _write_key(folder / "huge_00001_.safetensors", {**tensors, KEY_I: torch.zeros(1, 4, 512, 512)},
                      {**metadata, "image_width": "4096", "image_height": "4096"})
    start = time.monotonic()
    _refused(comfy_server, _recover(workflow_api, key_path=huge), "DiffPrivacyLoadKey",
             "this key's image (its Key-I) is 4096x4096 pixels, above the 2048 pixels a side",
             "use the key file Save Key wrote")
    assert time.monotonic() - start < 20  # it used to run for over 14 minutes, deaf to Cancel
    liar = _write_key(folder / "liar_00001_.safetensors", {**tensors, KEY_I: torch.zeros(1, 4, 256, 256)}, metadata)
    _refused(comfy_server, _recover(workflow_api, key_path=liar), "DiffPrivacyLoadKey",
             "Key-I holds the latent of a 2048x2048 image but the file records 64x64")
    nan = _write_key(folder / "nan_00001_.safetensors",
                     {**tensors, KEY_I: torch.full_like(tensors[KEY_I], float("nan"))}, metadata)
    _refused(comfy_server, _recover(workflow_api, key_path=nan), "DiffPrivacyLoadKey",
             "nan_00001_.safetensors: tensor 'key_i' holds NaN or infinity", "damaged")
    difp = DIFPKey(key_i_latent(torch.zeros(1, 4, 8, 8), steps=4, sigma=1.0, model_fingerprint=None,
                                clip_fingerprint=None), [[torch.zeros(1, 77, 64), {}]], torch.zeros(1, 512),
                   torch.zeros(1, 5, 2), "mtcnn", 4, 0.8)
    write_difp_key(folder / "difp-key_00001_.safetensors", difp)
    _refused(comfy_server, _recover(workflow_api, key_path="diffprivacy/difp-key_00001_.safetensors"),
             "DiffPrivacyLoadKey", "this is a DIFP key file", "Load DIFP Key")
    api = _recover(workflow_api, key_path=real_key)
    api[only(api, "DiffPrivacySaveImageClean")]["inputs"]["filename_prefix"] = "diffprivacy/recovered-again"
    (png,) = comfy_server.output_images(comfy_server.run(api, timeout=120))
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_face_model_loader_auto_skips_files_that_do_not_load_and_says_which(comfy_server, adapters):
    """A damaged insightface pack listed first: auto used to fail on it; now it takes the next model and names the
    skipped files on the node."""
    import shutil
    broken = comfy_server.base / "models" / "insightface" / "models" / "aaa-damaged"
    broken.mkdir(parents=True)
    try:
        for name in ("det_10g.onnx", "w600k_r50.onnx"):
            (broken / name).write_bytes(b"\x08\x07not an onnx graph" * 64)
        api = {"9401": {"class_type": "DiffPrivacyFaceModelLoader", "inputs": {
                   "detector": "auto", "recognizer": "auto", "insightface_pack": "auto", "threshold": 0.123,
                   "device": "auto"}},  # a threshold no other test uses: the node runs, not answered from the cache
               "9402": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
               "9403": {"class_type": "DiffPrivacyFaceAnalyze", "inputs": {
                   "face_model": ["9401", 0], "image": ["9402", 0], "face": "largest", "face_index": 0,
                   "if_no_face": "error"}},
               "9404": {"class_type": "PreviewImage", "inputs": {"images": ["9403", 1]}}}
        entry = comfy_server.run(api, timeout=300)
        (note,) = entry["outputs"]["9401"]["text"]
        assert "skipped, as they do not load" in note, note
        assert "detector scrfd (det_10g.onnx" in note and "recognizer arcface-r50 (w600k_r50.onnx" in note, note
        assert "recognizer arcface-r50" in note.split(";")[0]  # buffalo_l's good copy was taken next
        assert comfy_server.output_images(entry, "9404")
    finally:
        shutil.rmtree(broken)


# -- Cancel stops long work within one step ------------------------------------------------------------------------
def _interrupt_once_running(comfy_server, api: dict, node: str, steps: int, timeout: float = 300):
    """Queue ``api``; when ``node`` reports its first step done on its ``steps``-long progress bar, POST /interrupt.
    Returns (the step seen when the interrupt was sent, the steps the node reported after it, how the run ended)."""
    import asyncio
    import json

    import aiohttp

    async def watch():
        url = f"ws://127.0.0.1:{comfy_server.port}/ws?clientId={comfy_server.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            status, body = await asyncio.to_thread(comfy_server.post_prompt, api)
            assert status == 200, body
            prompt_id, sent_at, after = body["prompt_id"], None, set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                msg = await asyncio.wait_for(ws.receive(), timeout=max(deadline - loop.time(), 1))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # previews
                kind, data = json.loads(msg.data)["type"], json.loads(msg.data).get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if kind == "progress" and data.get("node") == node and data.get("max") == steps:
                    if sent_at is None and data["value"] >= 1:
                        sent_at = data["value"]
                        await asyncio.to_thread(comfy_server.interrupt)
                    elif sent_at is not None and data["value"] > sent_at:
                        after.add(data["value"])
                elif kind in ("execution_interrupted", "execution_success", "execution_error"):
                    return sent_at, sorted(after), kind

    return asyncio.run(watch())


@pytest.fixture(scope="module")
def long_key(comfy_server, real_key):
    """A valid key file for a 512 x 512 image recovered over 1000 steps (Key-E of a real key, Key-I zeros): each step
    takes long enough on a CPU that the interrupt lands within the step it was sent in."""
    import torch

    from diffprivacy.inversion.keyfile import KEY_I, read_key_file
    tensors, metadata = read_key_file(comfy_server.base / "output" / real_key)
    return _write_key(comfy_server.base / "output" / "diffprivacy" / "long_00001_.safetensors",
                      {**tensors, KEY_I: torch.zeros(1, 4, 64, 64)},
                      {**metadata, "image_width": "512", "image_height": "512", "steps": "1000"})


def _long_fsap(workflow_api, steps):
    api = workflow_api("fsap")
    load = only(api, "LoadImage")
    api["9001"] = {"class_type": "ImageScale", "inputs": {"image": [load, 0], "upscale_method": "area",
                                                          "width": 64, "height": 64, "crop": "center"}}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if nid != "9001" and value == [load, 0]:
                node["inputs"][name] = ["9001", 0]
    api[only(api, "DiffPrivacyFSAP")]["inputs"].update(max_iterations=steps, k=1, steps=4, resolution=64, tau=2.0)
    return api


@pytest.mark.parametrize("method", ["recover", "hide", "fsap", "de-id"])
def test_cancel_stops_long_work_within_one_step(comfy_server, workflow_api, adapters, pools, long_key, method):
    if method == "recover":
        steps, api = 1000, _recover(workflow_api, key_path=long_key)
        node = only(api, "DiffPrivacyRecover")
    elif method == "hide":
        steps, api = 997, workflow_api("hide-from-detectors")
        node = only(api, "DiffPrivacyHideFromDetectors")
        api[node]["inputs"].update(iterations=steps, range_rp=0.5, epsilon=0.05)  # never hides: runs on
    elif method == "fsap":
        steps = 37
        api = _long_fsap(workflow_api, steps)
        node = only(api, "DiffPrivacyFSAP")
    else:
        steps, api, node = 41, _deid(pools["good"], steps=4, iterations=41, prompt="a person"), "9306"
    sent_at, after, ended = _interrupt_once_running(comfy_server, api, node, steps)
    assert sent_at is not None, f"{method} reported no step before it {ended}"
    assert len(after) <= 1, f"{method} went on for {len(after)} steps after Cancel ({after} after {sent_at})"
    # FSAP keeps the best W found so far and delivers its render (its documented Cancel); the others stop
    assert ended == ("execution_success" if method == "fsap" else "execution_interrupted"), ended
    import time
    deadline = time.monotonic() + 30  # the queue item is closed just after the message: the server is free again
    while comfy_server.get_json("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert comfy_server.alive() and not comfy_server.get_json("/queue")["queue_running"]
