"""MediaPipe FaceMesh (``face_landmark.tflite``: 468 points in 3-D) in torch, for evaluation.

As MediaPipe's face landmark graph runs it: the face's region of interest is a detection's box, turned so
that the eyes lie level (rotation from the eye-to-eye vector), made square on its long side and grown
1.5x about its centre; that rotated square is resampled to 192x192 (bilinear), values in [0, 1], and the
network returns 468 (x, y, z) in pixels of that crop plus a face-presence logit (face when sigmoid > 0.5).
Points are mapped back through the same rotation and scale; z is scaled like x (MediaPipe's convention:
relative depth, smaller = nearer the camera).

Any detector's :class:`~.base.Face` gives the ROI (its box and its two eye landmarks); MediaPipe's own
graph uses BlazeFace's. For comparing an original with its protected version, run both through the SAME
ROI (from the original) so that the difference measures the mesh, not the detector.

Mesh indices used below (MediaPipe's canonical face mesh): eye outer corners 33 (image left on a
frontal face) and 263, forehead 10, chin 152, nose tip 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Face
from .tflite import TFLiteModule

FILENAME = "face_landmark.tflite"
ROI_SCALE = 1.5
N_POINTS = 468
EYE_OUTER = (33, 263)
FOREHEAD, CHIN, NOSE_TIP = 10, 152, 1


@dataclass
class Roi:
    cx: float
    cy: float
    size: float       # side of the square, pixels
    angle: float      # radians; the crop's x axis is the image's rotated by this angle

    @classmethod
    def from_face(cls, face: Face, scale: float = ROI_SCALE) -> "Roi":
        x1, y1, x2, y2 = (float(v) for v in face.box)
        eyes = face.landmarks[:2].float()
        d = eyes[1] - eyes[0]
        angle = math.atan2(float(d[1]), float(d[0]))
        return cls((x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * scale, angle)

    def to_image(self, uv: torch.Tensor) -> torch.Tensor:
        """(..., 2) crop coordinates in [0, 1] -> image pixels."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (uv[..., 0] - 0.5) * self.size, (uv[..., 1] - 0.5) * self.size
        return torch.stack([self.cx + c * u - s * v, self.cy + s * u + c * v], -1)


@dataclass
class Mesh:
    points: torch.Tensor   # (468, 3) x, y in image pixels, z relative depth (pixels of x's scale)
    score: float           # face presence probability

    @property
    def found(self) -> bool:
        return self.score > 0.5


class FaceMesh:
    """MediaPipe's face landmark model: :meth:`run` on one image and ROI."""

    name = "facemesh"

    def __init__(self, net: TFLiteModule):
        if tuple(net.input_shape) != (1, 192, 192, 3) or net.shapes[net.outputs[0]][-1] != N_POINTS * 3:
            raise ValueError(f"{net.path} is not MediaPipe's FaceMesh ({FILENAME}: input (1, 192, 192, 3), "
                             f"1404 outputs); got input {net.input_shape}")
        self.net = net.eval().requires_grad_(False)
        self.side = 192

    def to(self, device):
        self.net.to(device)
        return self

    def crop(self, image: torch.Tensor, roi: Roi) -> torch.Tensor:
        """(H, W, 3) [0, 1] -> (1, 192, 192, 3) the rotated square ROI resampled (zero outside the image)."""
        h, w = image.shape[:2]
        device = next(iter(self.net.buffers())).device
        t = (torch.arange(self.side, device=device, dtype=torch.float32) + 0.5) / self.side
        vv, uu = torch.meshgrid(t, t, indexing="ij")
        xy = roi.to_image(torch.stack([uu, vv], -1))                 # pixel centres sampled
        grid = torch.stack([(xy[..., 0] + 0.5) / w * 2 - 1, (xy[..., 1] + 0.5) / h * 2 - 1], -1)
        img = image.to(device=device, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0)
        out = F.grid_sample(img, grid.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.permute(0, 2, 3, 1)

    @torch.no_grad()
    def run(self, image: torch.Tensor, roi: Roi) -> Mesh:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"FaceMesh expects one (H, W, 3) RGB image, got shape {tuple(image.shape)}")
        raw, flag = self.net(self.crop(image, roi))
        p = raw.reshape(N_POINTS, 3).float().cpu() / self.side
        xy = roi.to_image(p[:, :2])
        z = p[:, 2:] * roi.size
        return Mesh(torch.cat([xy, z], 1), float(torch.sigmoid(flag.reshape(-1)[0])))


def inter_ocular(points: torch.Tensor) -> float:
    """Distance (pixels) between the outer eye corners of a (468, 2+) mesh."""
    a, b = EYE_OUTER
    return float((points[a, :2] - points[b, :2]).norm())


def pose_angles(points: torch.Tensor) -> dict[str, float]:
    """Yaw, pitch, roll in degrees from a (468, 3) mesh: the face's own axes (x: outer eye corner to outer eye
    corner, y: forehead to chin, made orthogonal to x) read in the image's frame. Geometric angles of the mesh,
    0 for a frontal upright face; good for comparing two meshes of one face, not a calibrated head pose."""
    p = points.double()
    x = p[EYE_OUTER[1]] - p[EYE_OUTER[0]]
    x = x / x.norm()
    y = p[CHIN] - p[FOREHEAD]
    y = y - (y @ x) * x
    y = y / y.norm()
    return {"yaw": math.degrees(math.atan2(float(x[2]), float(x[0]))),
            "pitch": math.degrees(math.atan2(float(y[2]), float(y[1]))),
            "roll": math.degrees(math.atan2(float(x[1]), float(x[0])))}


def load_facemesh(path: str | Path, device="cpu") -> FaceMesh:
    return FaceMesh(TFLiteModule(path)).to(device)
