"""The attribute-preservation proxy: a linear probe fitted on the originals' features, tested on anonymized ones."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import shared_path

from diffprivacy.evaluation.attribute_probe import probe_agreement


def _features(n=60, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = ["smiling" if i % 2 else "neutral" for i in range(n)]
    direction = torch.randn(d, generator=g)
    signs = torch.tensor([1.0 if lab == "smiling" else -1.0 for lab in labels])
    return signs[:, None] * direction + 0.5 * torch.randn(n, d, generator=g), labels


def test_kept_attributes_agree_and_destroyed_ones_fall_to_chance():
    x, labels = _features()
    kept = probe_agreement(x, x + 0.05 * torch.randn_like(x), labels)
    assert kept["accuracy_originals_cv"] > 0.9 and kept["agreement"] > 0.9 and kept["accuracy_anonymized"] > 0.9
    shuffled = probe_agreement(x, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))], labels)
    assert shuffled["agreement"] < 0.75 and shuffled["accuracy_anonymized"] < 0.75
    assert kept["chance"] == 0.5


def test_bad_labels_are_refused_clearly():
    x, labels = _features(n=6)
    with pytest.raises(ValueError, match="one class only"):
        probe_agreement(x, x, ["a"] * 6)
    with pytest.raises(ValueError, match="at least two images"):
        probe_agreement(x, x, ["a"] * 5 + ["b"])
    with pytest.raises(ValueError, match="pair row by row"):
        probe_agreement(x, x[:5], labels)


def test_the_evaluation_command_reports_the_probe(tmp_path, tiny_clip_vision_path):
    import evaluate  # scripts/
    src = shared_path("data", "faces-13id")
    names = sorted(p.name for p in src.glob("*.jpg"))[:8]
    (tmp_path / "orig").mkdir()
    for name in names:
        shutil.copy(src / name, tmp_path / "orig" / name)
    labels = {name: ("a" if i % 2 else "b") for i, name in enumerate(names)}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    code = evaluate.main(["--originals", str(tmp_path / "orig"), "--protected", str(tmp_path / "orig"),
                          "--recognizers", "", "--no-lpips", "--out", str(tmp_path / "out"),
                          "--attributes", str(tmp_path / "labels.json"), "--clip-vision", str(tiny_clip_vision_path)])
    assert code == 0
    probe = json.loads((tmp_path / "out" / "report.json").read_text())["attribute_probe"]
    assert probe["n"] == 8 and probe["agreement"] == 1.0  # the same images: the probe predicts the same
