"""LPIPS (Zhang et al. 2018, AlexNet variant v0.1) in plain torch, only from the user's files.

Nothing is downloaded: both files must be in a ``lpips`` model folder (ComfyUI's
``models/lpips/``, or ``$DIFFPRIVACY_MODELS_DIR/lpips`` outside ComfyUI):

* ``alex.pth``: the LPIPS linear heads (``lin0.model.1.weight`` ... ``lin4``), as shipped in
  the ``lpips`` package's ``weights/v0.1/``;
* ``alexnet-owt-7be5be79.pth`` (or any ``alexnet*.pth``/``.safetensors``): torchvision's
  ImageNet AlexNet state dict (``features.0.weight`` ...); only the convolutions are used.

Without them the report says LPIPS is absent and why.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F


class LPIPSUnavailable(RuntimeError):
    pass


# torchvision AlexNet ``features``: (index, in, out, kernel, stride, padding); pools follow 0, 3, 10
_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
          (10, 256, 256, 3, 1, 1))
_POOL_BEFORE = {3, 6}  # max-pool (3, 2) before these convs
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def lpips_folders() -> list[Path]:
    try:
        import folder_paths
        base = Path(folder_paths.models_dir) / "lpips"
        extra = [Path(p) for p in folder_paths.folder_names_and_paths.get("lpips", ([], None))[0]]
        return [base] + [p for p in extra if p != base]
    except ImportError:
        env = os.environ.get("DIFFPRIVACY_MODELS_DIR")
        return [Path(env) / "lpips"] if env else []


def _read(path: Path) -> dict:
    from ..guidance.weights import read_tensor_file
    return read_tensor_file(path, "Expected lpips' alex.pth or torchvision's alexnet-owt-7be5be79.pth.")


class LPIPS:
    """AlexNet-LPIPS. ``distance(a, b)`` on (H, W, 3) [0, 1] images; 0 for identical images."""

    def __init__(self, backbone: dict, heads: dict, source: str = ""):
        self.convs = []
        for idx, cin, cout, k, s, p in _CONVS:
            w, b = backbone[f"features.{idx}.weight"], backbone[f"features.{idx}.bias"]
            if tuple(w.shape) != (cout, cin, k, k):
                raise ValueError(f"AlexNet features.{idx}.weight has shape {tuple(w.shape)}, "
                                 f"expected {(cout, cin, k, k)}")
            self.convs.append((idx, w.float(), b.float(), s, p))
        self.heads = [heads[f"lin{i}.model.1.weight"].float() for i in range(5)]
        self.source = source

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x * 2 - 1 - _SHIFT) / _SCALE
        feats = []
        for idx, w, b, s, p in self.convs:
            if idx in _POOL_BEFORE:
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, w, b, stride=s, padding=p))
            feats.append(x)
        return feats

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        fa = self.features(a.permute(2, 0, 1).unsqueeze(0).float())
        fb = self.features(b.permute(2, 0, 1).unsqueeze(0).float())
        total = 0.0
        for x, y, lin in zip(fa, fb, self.heads):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += float(F.conv2d((x - y) ** 2, lin).mean())
        return total


_CACHE: dict = {}


def load_lpips(folders: list[Path] | None = None) -> LPIPS:
    """The LPIPS model from the user's folders; :class:`LPIPSUnavailable` says what is missing."""
    folders = lpips_folders() if folders is None else folders
    for d in folders:
        heads = d / "alex.pth"
        backs = sorted(p for p in d.glob("alexnet*") if p.suffix in (".pth", ".safetensors")) if d.is_dir() else []
        if heads.is_file() and backs:
            key = (str(heads), str(backs[0]), heads.stat().st_mtime_ns, backs[0].stat().st_mtime_ns)
            if key not in _CACHE:
                try:
                    _CACHE[key] = LPIPS(_read(backs[0]), _read(heads), f"{heads} + {backs[0].name}")
                except (KeyError, ValueError, RuntimeError, OSError) as e:
                    raise LPIPSUnavailable(f"LPIPS weights in {d} could not be used: {type(e).__name__}: {e}") from e
            return _CACHE[key]
    where = ", ".join(str(d) for d in folders) or "no lpips model folder (set DIFFPRIVACY_MODELS_DIR outside ComfyUI)"
    raise LPIPSUnavailable(f"LPIPS weights absent: put alex.pth (lpips v0.1 heads) and alexnet-owt-7be5be79.pth "
                           f"(torchvision AlexNet) in {where}")
