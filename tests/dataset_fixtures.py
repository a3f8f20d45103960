"""Dataset-command pieces the Ray workers import by name (tests/ is on their PYTHONPATH): a cheap method that kills
its worker on one marked image, the De-ID method loading the tiny model type, small face images."""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from diffprivacy.methods.dataset import Method, Protected, Setting


def _invert_or_die(settings: dict):
    def protect(image: torch.Tensor, seed: int) -> Protected:
        if float(image[..., 0].mean()) > 0.9 and float(image[..., 1:].mean()) < 0.1:  # the poison image: pure red
            os._exit(3)  # what a segfaulting library or the kernel's OOM killer does to the worker
        return Protected(1.0 - image)
    return protect


POISON = Method("invert-or-die", _invert_or_die, {"strength": Setting(float, 1.0, 0.0, 1.0)})


def _tiny_deid(settings: dict):
    import comfy_test_pack  # noqa: F401  (registers the tiny model type in this worker)

    from diffprivacy.methods.deid_dataset import DeIDWorker
    return DeIDWorker(settings)


def tiny_deid_method() -> Method:
    from diffprivacy.methods.dataset_methods import METHODS
    return replace(METHODS["diffusion-de-id"], factory=_tiny_deid)


def small_faces(src: Path, folder: Path, count: int, size: int = 224) -> list[str]:
    """``count`` small copies of the photos in ``src`` (cycled), every fifth in a sub-folder; their relative paths."""
    from PIL import Image
    photos = sorted(src.glob("*.jpg"))
    rels = []
    for i in range(count):
        rel = f"sub/f{i:02d}.jpg" if i % 5 == 0 else f"f{i:02d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            im.save(folder / rel, quality=92)
        rels.append(rel)
    return sorted(rels)


def copy_faces(src: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in sorted(src.glob("*.jpg"))[:count]]
