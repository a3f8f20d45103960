"""RetinaFace (ResNet-50, facexlib layout) with random weights: the file layout users have, the priors and
the box decoding, and the loader's folder lookup. No real weights exist in CI; this checks that a
``detection_Resnet50_Final.pth`` written with facexlib's key names (DataParallel ``module.`` prefix included)
loads with ``weights_only=True`` and that the heads are decoded as facexlib decodes them."""
from __future__ import annotations

import pytest
import torch

from diffprivacy.guidance.face import loader
from diffprivacy.guidance.face.retinaface import FILENAME, RetinaFaceNet, decode, load_retinaface, priors

# Key names of facexlib's detection_Resnet50_Final.pth (torchvision ResNet-50 body, FPN, SSH, heads)
FACEXLIB_KEYS = ["body.conv1.weight", "body.bn1.running_var", "body.layer1.0.downsample.0.weight",
                 "body.layer4.2.conv3.weight", "fpn.output1.0.weight", "fpn.merge2.1.bias", "ssh1.conv3X3.0.weight",
                 "ssh3.conv7x7_3.1.running_mean", "ssh2.conv5X5_2.0.weight", "ClassHead.0.conv1x1.weight",
                 "BboxHead.2.conv1x1.bias", "LandmarkHead.1.conv1x1.weight"]


@pytest.fixture(scope="module")
def retinaface_file(tmp_path_factory):
    torch.manual_seed(0)
    net = RetinaFaceNet()
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("facedetection") / FILENAME
    torch.save(sd, path)
    return path


def test_the_state_dict_has_facexlibs_key_names_and_shapes():
    sd = RetinaFaceNet().state_dict()
    assert all(k in sd for k in FACEXLIB_KEYS)
    assert sd["ClassHead.0.conv1x1.weight"].shape == (4, 256, 1, 1)          # 2 anchors x 2 classes
    assert sd["LandmarkHead.0.conv1x1.weight"].shape == (20, 256, 1, 1)
    assert sd["fpn.output3.0.weight"].shape == (256, 2048, 1, 1)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 27_293_600


def test_priors_and_decoding_follow_facexlib():
    p = priors(64, 96)
    assert p.shape == ((8 * 12 + 4 * 6 + 2 * 3) * 2, 4)
    assert p[0].tolist() == [4.0, 4.0, 16.0, 16.0] and p[1].tolist() == [4.0, 4.0, 32.0, 32.0]
    assert p[2].tolist() == [12.0, 4.0, 16.0, 16.0]
    assert torch.allclose(decode(torch.zeros(1, 4), p[:1]), torch.tensor([[-4.0, -4.0, 12.0, 12.0]]))
    shifted = decode(torch.tensor([[1.0, 0.0, 0.0, 5.0]]), p[:1])   # cx + 1 * 0.1 * 16; h * exp(5 * 0.2)
    assert torch.allclose(shifted, torch.tensor([[-2.4, 4 - 8 * 2.718281828, 13.6, 4 + 8 * 2.718281828]]))


def test_loads_a_facexlib_file_and_runs(retinaface_file):
    det = load_retinaface(retinaface_file)
    img = torch.rand(64, 80, 3)
    faces = det.detect(img)   # random weights: any number of faces, but well-formed
    assert all(f.box.shape == (4,) and f.landmarks.shape == (5, 2) for f in faces)
    x = (img.permute(2, 0, 1)[None] * 255).requires_grad_(True)
    (a,) = det.anchor_scores(x)
    assert a.logits.shape[0] == a.boxes.shape[0] == priors(64, 80).shape[0]
    (g,) = torch.autograd.grad(a.logits.sum(), x)
    assert g.abs().sum() > 0


def test_a_wrong_file_is_refused_with_what_it_expected(tmp_path):
    bad = tmp_path / FILENAME
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a RetinaFace ResNet-50 in facexlib's layout"):
        load_retinaface(bad)


def test_loader_finds_it_in_facedetection_and_names_the_folder_when_missing(retinaface_file, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facedetection", ([str(tmp_path / "empty")], set()))
    with pytest.raises(FileNotFoundError, match=r"detection_Resnet50_Final\.pth.*empty"):
        loader.load_detector("retinaface")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facedetection",
                        ([str(retinaface_file.parent)], set()))
    det = loader.load_detector("retinaface")
    assert loader.load_detector("retinaface") is det
