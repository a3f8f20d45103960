"""The shipped DIFP workflows in a live ComfyUI (tiny model, random-weight adapters with the released layouts, a tiny
ArcFace ONNX in a buffalo_l folder, the tiny CLIP vision under the ViT-H name): difp-protect writes protected images
and a sealed key, difp-recover reads it back; a Diff-Privacy-style bad key is refused and the server keeps serving."""
from __future__ import annotations

import io

import pytest
import torch

import ip_adapter_fixtures as fx
from conftest import nodes_of
from diffprivacy.guidance import ip_adapter as ipa


@pytest.fixture(scope="module")
def served(comfy_server, tiny_sd, tiny_clip_vision, tiny_clip_vision_path, tmp_path_factory):
    if not (comfy_server.base / "input" / "face.png").exists():
        pytest.skip("shared photos are not present (input/face.png)")
    d = tmp_path_factory.mktemp("difp_served")
    shape = fx.tiny_shape(tiny_sd[0], tiny_clip_vision)
    comfy_server.put_model("ipadapter", "ip-adapter-faceid_sd15.bin",
                           fx.write_adapter(d / "ip-adapter-faceid_sd15.bin", "faceid", **shape))
    comfy_server.put_model("ipadapter", "ip-adapter_sd15.safetensors",
                           fx.write_adapter(d / "ip-adapter_sd15.safetensors", "ip-adapter", **shape))
    comfy_server.put_model("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", tiny_clip_vision_path)
    comfy_server.put_model("insightface/models/buffalo_l", "w600k_r50.onnx",
                           fx.export_arcface_onnx(d / "buffalo_l" / "w600k_r50.onnx"))
    assert ipa.FACEID_LORAS  # the FaceID LoRA is left out on purpose: the workflow runs without it (warned)
    from PIL import Image
    style = comfy_server.base / "input" / "style.png"  # the shipped workflow's style image: any picture
    if not style.exists():
        Image.fromarray((torch.rand(96, 96, 3, generator=torch.Generator().manual_seed(8)) * 255).byte().numpy()
                        ).save(style)
    return comfy_server


def _small_protect(api, password):
    node = nodes_of(api, "DiffPrivacyDIFPProtect")[0]["inputs"]
    node.update(steps=5, resolution=128, num_outputs=1)
    nodes_of(api, "DiffPrivacySaveDIFPKey")[0]["inputs"]["password"] = password
    return api


def test_difp_protect_then_recover_run_live_and_a_wrong_key_is_refused(served, workflow_api):
    from PIL import Image
    entry = served.run(_small_protect(workflow_api("difp-protect"), "pw"), timeout=600)
    images = served.output_images(entry)
    size = Image.open(served.base / "input" / "face.png").size
    assert images and Image.open(io.BytesIO(images[-1])).size == size  # the photo at its own size
    (served.base / "input" / "protected.png").write_bytes(images[-1])   # what difp-recover pastes the face into
    keys = sorted((served.base / "output" / "diffprivacy").glob("difp-key_*.safetensors"))
    assert keys, "no DIFP key file written"
    recover = workflow_api("difp-recover")
    load = nodes_of(recover, "DiffPrivacyLoadDIFPKey")[0]["inputs"]
    load.update(key_path=str(keys[-1]), password="wrong")
    bad = served.run(recover, timeout=300, expect_error=True)
    error = [m for kind, m in bad["status"]["messages"] if kind == "execution_error"][0]
    assert "wrong password" in error["exception_message"]
    assert served.alive()
    load["password"] = "pw"
    entry = served.run(recover, timeout=600)
    images = served.output_images(entry)
    assert images and Image.open(io.BytesIO(images[-1])).size == size
