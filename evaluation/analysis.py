"""One pass of a FACE_MODEL over one image: every face (box + landmarks) and the largest
face's identity embedding. Every metric reads these, so each image is detected once per model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FaceAnalysis:
    boxes: list = field(default_factory=list)      # (4,) per face, largest first
    points: list = field(default_factory=list)     # (N, 2) per face: 68 dlib points, else the 5 landmarks
    landmarks: torch.Tensor | None = None          # (5, 2) of the largest face (contract order)
    embedding: torch.Tensor | None = None          # (D,) of the largest face

    @property
    def n_faces(self) -> int:
        return len(self.boxes)

    @property
    def detected(self) -> bool:
        return bool(self.boxes)


@torch.no_grad()
def embed_at(model, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """(D,) embedding of ``image`` (H, W, 3) aligned by ``landmarks`` (5, 2)."""
    emb = model.embed(image.permute(2, 0, 1).unsqueeze(0).float(), landmarks.unsqueeze(0).float())[0]
    return emb.detach().float().cpu()


@torch.no_grad()
def analyse_face(model, image: torch.Tensor, embed: bool = True) -> FaceAnalysis:
    """Detect every face in ``image`` (H, W, 3); embed the largest when ``embed``."""
    if hasattr(model, "detect_68"):  # dlib: keep its 68 points for the landmark distance
        found = [(f, torch.from_numpy(p).float()) for f, p in model.detect_68(image)]
    else:
        found = [(f, f.landmarks.float()) for f in model.detect(image)]
    found.sort(key=lambda fp: fp[0].area, reverse=True)
    if not found:
        return FaceAnalysis()
    face = found[0][0]
    emb = embed_at(model, image, face.landmarks.float()) if embed else None
    return FaceAnalysis([f.box.float().cpu() for f, _ in found], [p.cpu() for _, p in found],
                        face.landmarks.float().cpu(), emb)
