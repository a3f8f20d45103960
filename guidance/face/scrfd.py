"""SCRFD face detector (insightface's ``det_10g.onnx`` / ``det_2.5g.onnx`` / ``scrfd_*.onnx``) run in torch,
without the ``insightface`` package and without onnxruntime.

The ONNX graph is executed by the pack's own interpreter (``onnx_torch.py``), so detection needs only the
``onnx`` package, runs on the device ComfyUI uses, and is differentiable (the detector-hiding attack reads
its score logits). ``tests/test_scrfd_torch.py`` checks it against onnxruntime.

Reimplements insightface's ``SCRFD.detect``: letterbox the image into the input size (640x640
by default, top-left aligned, zero padding), RGB normalised ``(x - 127.5) / 128``; the graph's
outputs are, for each stride (8, 16, 32 [, 64, 128]), scores (N, 1), box distances (N, 4) and
optionally keypoint offsets (N, 10), all in units of the stride, with ``num_anchors`` anchors
per feature-map cell centred at ``(x * stride, y * stride)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .anchors import AnchorScores, AttackTarget
from .base import Detector, Face
from .mtcnn import nms


class SCRFD(Detector, AttackTarget):
    min_face = 10

    def __init__(self, path: str | Path, input_size: int = 640, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, device: str | torch.device = "cpu"):
        from .onnx_torch import load_onnx_module
        self.path = Path(path)
        self.name = f"scrfd:{self.path.stem}"
        self.graph = load_onnx_module(self.path).to(device)
        n_in, n_out = len(self.graph.input_names), len(self.graph.output_names)
        shape = self.graph.input_shapes[0] if n_in == 1 else []
        if n_in != 1 or len(shape) != 4 or n_out not in (6, 9, 10, 15):
            raise ValueError(f"{self.path} is not an SCRFD detector: expected one NCHW input and 6/9/10/15 "
                             f"outputs (scores, boxes[, keypoints] per stride), found {n_in} input(s) and "
                             f"{n_out} output(s)")
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0 and shape[3] > 0
        self.input_hw = (shape[2], shape[3]) if fixed else (input_size, input_size)
        self.fmc = 3 if n_out in (6, 9) else 5
        self.strides = [8, 16, 32] if self.fmc == 3 else [8, 16, 32, 64, 128]
        self.has_kps = n_out in (9, 15)
        self.num_anchors = 2
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        # Read score logits, not sigmoid probabilities (these saturate at 1.0 and lose their gradient).
        self.logit_outputs = []
        for name in self.graph.output_names[:self.fmc]:
            sig = self.graph.sigmoid_before(name)
            self.logit_outputs.append(sig is not None)
            if sig is not None:
                self.graph.no_sigmoid.add(sig.name)

    def modules(self):
        return [self.graph]

    def memory_bytes(self, h: int, w: int) -> int:
        th, tw = self.input_hw
        return int(8 * 3 * h * w * 4 + th * tw * 600 * 4)

    def _run(self, x255: torch.Tensor):
        """(1, 3, H, W) RGB [0, 255] -> (boxes (N, 4), logits (N,), keypoints (N, 5, 2)) in full-image pixels."""
        h, w = x255.shape[2:]
        th, tw = self.input_hw
        scale = min(th / h, tw / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        device = next(iter(self.graph.buffers()), x255).device
        img = F.interpolate(x255.to(device=device, dtype=torch.float32), size=(nh, nw), mode="bilinear",
                            align_corners=False, antialias=True)
        blob = F.pad((img - 127.5) / 128.0, (0, tw - nw, 0, th - nh))
        outs = self.graph(blob)
        if outs[0].dim() == 3:  # batched export: (1, N, C)
            outs = [o[0] for o in outs]
        logits, boxes, kps = [], [], []
        for i, stride in enumerate(self.strides):
            s = outs[i].reshape(-1)
            if not self.logit_outputs[i]:   # a graph without a Sigmoid to skip: invert its probabilities
                s = torch.logit(s.clamp(1e-7, 1 - 1e-7))
            d = outs[i + self.fmc].detach().reshape(-1, 4) * stride
            fh, fw = -(-th // stride), -(-tw // stride)
            if s.shape[0] != fh * fw * self.num_anchors:
                raise ValueError(f"{self.path}: output for stride {stride} has {s.shape[0]} scores, expected "
                                 f"{fh * fw * self.num_anchors}; not an SCRFD model of this layout")
            ys, xs = torch.meshgrid(torch.arange(fh, device=device), torch.arange(fw, device=device), indexing="ij")
            centers = torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride
            centers = centers.repeat_interleave(self.num_anchors, 0)
            logits.append(s)
            boxes.append(torch.cat([centers - d[:, :2], centers + d[:, 2:]], 1))
            if self.has_kps:
                k = outs[i + 2 * self.fmc].detach().reshape(-1, 10) * stride
                kps.append(centers.repeat(1, 5).view(-1, 5, 2) + k.view(-1, 5, 2))
        boxes_t = torch.cat(boxes) / scale
        kps_t = torch.cat(kps) / scale if kps else torch.zeros(boxes_t.shape[0], 5, 2, device=device)
        return boxes_t, torch.cat(logits), kps_t

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[Face]:
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"SCRFD expects one (H, W, 3) RGB image, got shape {tuple(image.shape)}")
        if not self.has_kps:
            raise ValueError(f"{self.path} has no keypoint outputs; a 5-landmark SCRFD model (det_10g.onnx, "
                             f"det_2.5g.onnx, *_kps.onnx) is needed for alignment")
        boxes, logits, kps = self._run(image.detach().float().permute(2, 0, 1).unsqueeze(0) * 255.0)
        scores = torch.sigmoid(logits)
        keep = scores >= self.score_threshold
        boxes, scores, kps = boxes[keep].cpu(), scores[keep].cpu(), kps[keep].cpu()
        if scores.numel() == 0:
            return []
        # insightface's NMS uses the inclusive (+1) box area too
        pick = nms(boxes, scores, self.nms_threshold)
        faces = [Face(box=boxes[i], landmarks=kps[i], score=float(scores[i])) for i in pick.tolist()]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def anchor_scores(self, x255: torch.Tensor, focus=None) -> list[AnchorScores]:
        boxes, logits, _ = self._run(x255)
        return [AnchorScores(self.name, boxes.detach().cpu(), logits, self.score_threshold)]


def scrfd_onnxruntime_outputs(path: str | Path, blob) -> list:
    """The raw outputs of onnxruntime on an input blob (N, 3, H, W): parity tests and black-box transfer only."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("onnxruntime is not installed (it is only needed for parity tests and the optional "
                          "black-box transfer measurement): pip install onnxruntime") from e
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: blob})
