"""Small analytic stand-ins for the encrypt/recover tests and benchmarks (a fixture module: no tests here).

- :class:`GaussianDenoiser`: the exact x0 estimate for Gaussian data N(mean, std^2) in ComfyUI's
  k-diffusion form, D(x, sigma) = (std^2 x + sigma^2 mean) / (std^2 + sigma^2).
- :class:`ToyDecoder`: a fixed smooth map latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in [0, 1].
- :class:`ToyFaceModel`: a fixed differentiable recognizer (pooled pixels -> tanh projection) with a
  "detector" that always finds one centred face; :class:`PhotoToyFaceModel`: the same with dlib's detector on
  photos (for the face pipeline on real group photos).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffprivacy.guidance.face.base import Face, FaceModel


class GaussianDenoiser:
    def __init__(self, mean: torch.Tensor, std: float):
        self.mean = mean
        self.std = float(std)
        self.calls = []  # sigmas the model was evaluated at

    def __call__(self, x, sigma, **extra):
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x)
        self.calls.append(float(sigma.reshape(-1)[0]))
        v = self.std ** 2
        return (v * x + s * s * self.mean) / (v + s * s)


class ToyDecoder:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, 4, 1, 1, generator=g) * 0.7

    def __call__(self, latent):
        rgb = F.conv2d(latent, self.weight.to(latent))
        return torch.sigmoid(F.interpolate(rgb, scale_factor=8, mode="bilinear", align_corners=False))


class ToyFaceModel(FaceModel):
    def __init__(self, dim: int = 16, seed: int = 1):
        super().__init__(name="toy", metric="cosine", threshold=0.4, differentiable=True)
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3 * 8 * 8, dim, generator=g) / 8.0

    def detect(self, image):
        h, w = image.shape[:2]
        lms = torch.tensor([[0.35 * w, 0.4 * h], [0.65 * w, 0.4 * h], [0.5 * w, 0.55 * h],
                            [0.38 * w, 0.72 * h], [0.62 * w, 0.72 * h]])
        return [Face(box=torch.tensor([0.2 * w, 0.2 * h, 0.8 * w, 0.9 * h]), landmarks=lms, score=0.99)]

    def embed(self, images, landmarks):
        pooled = F.adaptive_avg_pool2d(images - 0.5, 8).flatten(1)
        return F.normalize(torch.tanh(pooled @ self.proj.to(pooled) * 4.0), dim=1)


def toy_latent(seed: int, shape=(1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class PhotoToyFaceModel(ToyFaceModel):
    """The toy recognizer with a real detector for photos: dlib's HOG on an image larger than 256 pixels (a photo,
    several faces), and on a smaller one (a face crop of the pipeline) the one face at its centre, a third of its
    side, as a crop with factor 3 holds it."""

    def detect(self, image):
        h, w = image.shape[:2]
        if max(h, w) > 256:
            from face_fixtures import dlib_model
            return dlib_model().detect(image)
        lms = torch.tensor([[0.43 * w, 0.45 * h], [0.57 * w, 0.45 * h], [0.5 * w, 0.52 * h],
                            [0.44 * w, 0.6 * h], [0.56 * w, 0.6 * h]])
        return [Face(box=torch.tensor([w / 3, h / 3, 2 * w / 3, 2 * h / 3]), landmarks=lms, score=0.99)]
