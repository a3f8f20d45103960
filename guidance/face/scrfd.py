"""SCRFD face detector (insightface's ``det_10g.onnx`` / ``det_2.5g.onnx`` / ``scrfd_*.onnx``) run with
onnxruntime, without the ``insightface`` package.

Reimplements insightface's ``SCRFD.detect``: letterbox the image into the input size (640x640
by default, top-left aligned, zero padding), RGB normalised ``(x - 127.5) / 128``; the graph's
outputs are, for each stride (8, 16, 32 [, 64, 128]), scores (N, 1), box distances (N, 4) and
optionally keypoint offsets (N, 10), all in units of the stride, with ``num_anchors`` anchors
per feature-map cell centred at ``(x * stride, y * stride)``. Detection is not differentiable
(nothing needs it to be): alignment and recognition are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import Detector, Face
from .mtcnn import nms


class SCRFD(Detector):
    def __init__(self, path: str | Path, input_size: int = 640, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("the SCRFD detector of insightface packs needs onnxruntime: "
                              "pip install onnxruntime (or onnxruntime-gpu)") from e
        self.path = Path(path)
        self.name = f"scrfd:{self.path.stem}"
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as e:
            raise ValueError(f"{self.path} could not be opened as an ONNX model by onnxruntime: "
                             f"{type(e).__name__}: {str(e)[:300]}") from e
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) not in (6, 9, 10, 15):
            raise ValueError(f"{self.path} is not an SCRFD detector: expected one NCHW input and 6/9/10/15 "
                             f"outputs (scores, boxes[, keypoints] per stride), found {len(inputs)} input(s) and "
                             f"{len(outputs)} output(s)")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.input_hw = (shape[2], shape[3]) if fixed else (input_size, input_size)
        n = len(outputs)
        self.fmc = 3 if n in (6, 9) else 5
        self.strides = [8, 16, 32] if self.fmc == 3 else [8, 16, 32, 64, 128]
        self.has_kps = n in (9, 15)
        self.num_anchors = 2
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def detect(self, image: torch.Tensor) -> list[Face]:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"SCRFD expects one (H, W, 3) RGB image, got shape {tuple(image.shape)}")
        if not self.has_kps:
            raise ValueError(f"{self.path} has no keypoint outputs; a 5-landmark SCRFD model (det_10g.onnx, "
                             f"det_2.5g.onnx, *_kps.onnx) is needed for alignment")
        h, w = image.shape[:2]
        th, tw = self.input_hw
        scale = min(th / h, tw / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        img = image.detach().float().cpu().permute(2, 0, 1).unsqueeze(0) * 255.0
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        blob = torch.zeros(1, 3, th, tw)
        blob[:, :, :nh, :nw] = (img - 127.5) / 128.0
        outs = self.session.run(None, {self.input_name: blob.numpy()})
        if outs[0].ndim == 3:  # batched export: (1, N, C)
            outs = [o[0] for o in outs]
        scores, boxes, kps = [], [], []
        for i, stride in enumerate(self.strides):
            s = outs[i].reshape(-1)
            d = outs[i + self.fmc].reshape(-1, 4) * stride
            k = outs[i + 2 * self.fmc].reshape(-1, 10) * stride
            fh, fw = th // stride, tw // stride
            if s.shape[0] != fh * fw * self.num_anchors:
                raise ValueError(f"{self.path}: output for stride {stride} has {s.shape[0]} scores, expected "
                                 f"{fh * fw * self.num_anchors}; not an SCRFD model of this layout")
            ys, xs = np.mgrid[:fh, :fw]
            centers = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
            centers = np.repeat(centers, self.num_anchors, axis=0)
            keep = s >= self.score_threshold
            c = centers[keep]
            dk = d[keep]
            boxes.append(np.concatenate([c - dk[:, :2], c + dk[:, 2:]], 1))
            kps.append((np.tile(c, 5) + k[keep]).reshape(-1, 5, 2))
            scores.append(s[keep])
        scores_t = torch.from_numpy(np.concatenate(scores)).float()
        if scores_t.numel() == 0:
            return []
        boxes_t = torch.from_numpy(np.concatenate(boxes)).float() / scale
        kps_t = torch.from_numpy(np.concatenate(kps)).float() / scale
        # insightface's NMS uses the inclusive (+1) box area too
        keep = nms(boxes_t, scores_t, self.nms_threshold)
        faces = [Face(box=boxes_t[i], landmarks=kps_t[i], score=float(scores_t[i])) for i in keep.tolist()]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces
