"""The command-line report over folders with bad input (missing, extra, unreadable files, unknown
identities, a resized image), and the evaluation nodes as ComfyUI calls them."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import shared_path
from face_fixtures import dlib_model, faces13_image
from diffprivacy.evaluation.images import save_image
from diffprivacy.evaluation.baselines import apply_baseline
from diffprivacy.nodes import eval_nodes


def square(name: str, side: int = 384) -> torch.Tensor:
    """A faces-13id photo centre-cropped to a square and shrunk: nodes take equal-size batches."""
    img = faces13_image(name)
    h, w = img.shape[:2]
    c = min(h, w)
    img = img[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
    small = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=(side, side), mode="area")
    return small[0].permute(1, 2, 0)


@pytest.fixture()
def folders(tmp_path):
    """originals: 2 people x 2 photos; protected: a copy, a strong blur, a resized copy saved as PNG,
    an unreadable file, an extra file; one original is not in the identities file."""
    src = shared_path("data", "faces-13id")
    orig, prot = tmp_path / "orig", tmp_path / "prot"
    orig.mkdir()
    prot.mkdir()
    for n in ("img12.jpg", "img3.jpg", "img8.jpg", "img9.jpg"):
        shutil.copy(src / n, orig / n)
    shutil.copy(src / "img12.jpg", prot / "img12.jpg")
    img3 = faces13_image("img3.jpg")
    box = dlib_model().detect(img3)[0].box
    save_image(apply_baseline(img3, [box], "blur", 10.0)[0], prot / "img3.png")
    img8 = faces13_image("img8.jpg")
    small = torch.nn.functional.interpolate(img8.permute(2, 0, 1)[None], scale_factor=0.5, mode="bilinear")
    save_image(small[0].permute(1, 2, 0), prot / "img8.png")
    (prot / "img9.jpg").write_bytes(b"\xff\xd8 truncated")
    shutil.copy(src / "img1.jpg", prot / "unrelated.jpg")
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"identities": [["img12.jpg", "img3.jpg"], ["img8.jpg"], ["nobody.jpg"]]}))
    return orig, prot, ids, tmp_path / "out"


def test_cli_reports_numbers_and_every_bad_file(folders, capsys):
    import evaluate as cli  # scripts/evaluate.py (conftest puts scripts/ on sys.path)
    orig, prot, ids, out = folders
    gallery = out.parent / "gallery"  # other people for the identification protocol, and a photo without a face
    gallery.mkdir()
    shutil.copy(shared_path("data", "faces-13id", "img25.jpg"), gallery / "img25.jpg")
    save_image(torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)), gallery / "noise.png")
    rc = cli.main(["--originals", str(orig), "--protected", str(prot), "--identities", str(ids), "--out", str(out),
                   "--recognizers", "dlib,nonsense-net", "--distractors", str(gallery)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    assert "Protection success rate" in html and "Identification accuracy" in html
    problems = {(p["file"], p["folder"]): p["problem"] for p in rep["problems"]}
    assert "img9.jpg" in problems[("img9.jpg", "protected")]                      # unreadable
    assert problems[("unrelated.jpg", "protected")] == "no original with this name"
    assert problems[("img9.jpg", "identities")] == "not in the identities file"
    assert "resized" in problems[("img8.jpg", "protected")]
    assert ("nobody.jpg", "originals") in problems                                # listed, not found
    assert "nonsense-net" in rep["recognizers_unavailable"]
    files = {r["file"]: r for r in rep["per_file"]}
    assert files["img12.jpg"]["protected_pixels"]["psnr"] == "inf"               # a copy
    assert files["img12.jpg"]["models"]["dlib"]["protected"] is False
    assert files["img3.jpg"]["models"]["dlib"]["protected"] is None               # strong blur: no face found
    assert files["img3.jpg"]["models"]["dlib"]["distance"] is None
    assert files["img8.jpg"]["models"]["dlib"]["distance"] < 0.6                  # half size, same person
    assert files["img3.jpg"]["protected_pixels"]["psnr"] < 30
    s = rep["recognizers"]["dlib"]
    # §3.1.1 (default): the undetected face is reported separately, not counted as protected; Eq. 23 counts it
    p = s["protection"]
    assert (p["n"], p["n_detected"], p["n_undetected"]) == (3, 2, 1)
    assert p["success_rate"] == p["success_rate_separate"] == 0.0 and p["success_rate_eq23"] == pytest.approx(1 / 3)
    assert p["convention"] == "separate" and list(p["at_thresholds"]) == ["calibrated: L2 0.6"]
    ident = s["identification"]
    assert (ident["distractor_images"], ident["distractors_external"], ident["distractors_without_face"]) == (2, 1, 1)
    assert ident["protected_not_detected"] == 1 and rep["inputs"]["distractor_images"] == 2
    assert "originals of the other people + 1 external (2 images, 1 without a face)" in html
    assert rep["lpips"]["available"] is False and "alex.pth" in rep["lpips"]["reason"]
    printed = capsys.readouterr().out
    assert "Protection success rate" in printed and "distractors: 2 images" in printed
    assert "SR: Diff-Privacy §3.1.1" in printed


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    import evaluate as cli  # scripts/evaluate.py (conftest puts scripts/ on sys.path)
    assert cli.main(["--originals", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_every_eval_node_input_has_a_tooltip():
    for node_id, cls in eval_nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("DiffPrivacy")
        for section in cls.INPUT_TYPES().values():
            assert all(spec[1].get("tooltip") for spec in section.values()), node_id


def test_metric_nodes_on_a_copy_a_blur_and_noise():
    model = eval_nodes.DiffPrivacyDlibFaceModel().load(1600, 0.6)[0]
    assert model is dlib_model()
    a, b = square("img12.jpg"), square("img3.jpg")
    blurred = apply_baseline(b, [model.detect(b)[0].box], "blur", 10.0)[0]
    orig = torch.stack([a, b])
    prot = torch.stack([a.clone(), blurred])
    with torch.inference_mode():
        rate, details, undetected = eval_nodes.DiffPrivacyProtectionRate().measure(model, orig, prot, "own detection")
        # the strong blur hides the face from dlib's detector: reported separately, not counted as protected
        assert (rate, undetected) == (0.0, 1) and json.loads(details)["images"][1]["protected"] is None
        eq23 = list(eval_nodes.UNDETECTED_CHOICES)[1]
        rate, _, undetected = eval_nodes.DiffPrivacyProtectionRate().measure(model, orig, prot, "own detection", eq23)
        assert (rate, undetected) == (0.5, 1) and "Eq. 23" in eq23
        psnr, ssim, mse, details = eval_nodes.DiffPrivacyImageQuality().measure(orig[:1], prot[:1], model)
        assert psnr == math.inf and mse == 0 and json.loads(details)["images"][0]["cos_ie"] == pytest.approx(1.0)
        det, box_d, lm_d, _ = eval_nodes.DiffPrivacyFaceUtility().measure(model, orig[:1], prot[:1])
        assert (det, box_d, lm_d) == (1.0, 0.0, 0.0)
        noise = torch.rand(1, *a.shape, generator=torch.Generator().manual_seed(0))
        fig, table = eval_nodes.DiffPrivacyKeySecurity().measure(orig[:1], prot[:1], wrong_key_i=noise,
                                                                 face_model=model)
        rows = {r["variant"]: r for r in json.loads(table)}
        assert rows["correct key"]["psnr"] == "inf" and rows["correct key"][f"{model.name} same person"] is True
        assert rows["wrong Key-I"]["psnr"] < 12 and rows["wrong Key-I"][f"{model.name} same person"] is False
        assert fig.dim() == 4 and fig.shape[0] == 2 and fig.shape[-1] == 3
        with pytest.raises(ValueError, match="equally long"):
            eval_nodes.DiffPrivacyProtectionRate().measure(model, orig, prot[:1], "own detection")


def test_report_node_shows_tables_and_plots_and_reports_a_step_per_image(monkeypatch):
    model = dlib_model()
    names = ["img12.jpg", "img3.jpg", "img8.jpg", "img9.jpg"]
    batch = torch.stack([square(n, 256) for n in names])
    steps = []
    monkeypatch.setattr(eval_nodes, "StepProgress", lambda total: steps.append)  # what the node's bar receives
    with torch.inference_mode():
        images, text = eval_nodes.DiffPrivacyEvaluationReport().report(model, batch, batch.flip(0), "a, a, b, b")
        eval_nodes.DiffPrivacyFaceUtility().measure(model, batch[:2], batch[:2])
    assert [(s.done, s.total, s.text) for s in steps] == [(0, 4, "image 0"), (1, 4, "image 1"), (2, 4, "image 2"),
                                                          (3, 4, "image 3"), (4, 4, "done"),
                                                          (1, 2, "image 1/2"), (2, 2, "image 2/2")]
    rep = json.loads(text)
    assert images.dim() == 4 and images.shape[0] >= 4 and images.shape[-1] == 3
    s = rep["recognizers"][model.name]
    # reversed order: every "protected" image shows the other person
    assert s["protection"]["success_rate"] == 1.0 and s["identification"]["original"] == 1.0
    assert s["identification"]["protected"] == 0.0
    assert rep["protected_pixels"]["n"] == 4
    with pytest.raises(ValueError, match="one label per"):
        eval_nodes.DiffPrivacyEvaluationReport().report(model, batch, batch, "a, b")


def test_cli_key_security_table(tmp_path):
    import evaluate as cli  # scripts/evaluate.py (conftest puts scripts/ on sys.path)
    src = shared_path("data", "faces-13id", "img12.jpg")
    noise = torch.rand(*faces13_image("img12.jpg").shape, generator=torch.Generator().manual_seed(1))
    save_image(noise, tmp_path / "noise.png")
    rc = cli.main(["--key-original", str(src), "--key-recovered", f"correct key={src}",
                   "--key-recovered", f"wrong Key-I={tmp_path / 'noise.png'}", "--out", str(tmp_path / "ks")])
    assert rc == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "ks" / "key_security.json").read_text())}
    assert rows["correct key"]["psnr"] == "inf" and rows["correct key"]["dlib same person"] is True
    assert rows["wrong Key-I"]["dlib same person"] is False and rows["wrong Key-I"]["ssim"] < 0.1
    assert (tmp_path / "ks" / "key_security.png").stat().st_size > 10_000
    assert cli.main(["--key-original", str(src), "--key-recovered", "no-equals-sign", "--out", str(tmp_path)]) == 2


def test_folders_with_sub_folders_pair_by_relative_path(tmp_path):
    from diffprivacy.evaluation.images import list_images, pair_names
    for root, suffix in (("orig", ".jpg"), ("prot", ".png")):
        for rel in ("a", "sub/a", "sub/deeper/b"):
            path = tmp_path / root / (rel + suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    (tmp_path / "orig" / ".hidden").mkdir()
    (tmp_path / "orig" / ".hidden" / "c.jpg").write_bytes(b"")
    originals, protected = list_images(tmp_path / "orig"), list_images(tmp_path / "prot")
    assert list(originals) == ["a.jpg", "sub/a.jpg", "sub/deeper/b.jpg"]
    pairs, missing, extra = pair_names(originals, protected)
    assert pairs == {"a.jpg": "a.png", "sub/a.jpg": "sub/a.png", "sub/deeper/b.jpg": "sub/deeper/b.png"}
    assert missing == [] and extra == []
