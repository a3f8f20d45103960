"""A small TFLite reader: MediaPipe's float ``.tflite`` graphs (BlazeFace, FaceMesh) as torch modules.

No TensorFlow, no ``tflite`` package: a ``.tflite`` file is a FlatBuffer (tables reached through
vtables, little-endian offsets), and only the few tables of TFLite's schema that a float convolutional
graph needs are read here (Model, SubGraph, Tensor, Buffer, Operator, OperatorCode and the options of
the ops below). Weights stored as float16 and expanded by ``DEQUANTIZE`` ops are turned into float32
constants when the file is read.

The graph then runs op by op in the file's order (TFLite stores operators in execution order), each op
mapped to torch. TFLite is NHWC; four-dimensional activations are kept NCHW here (torch's convolution
layout) and only permuted where an op's meaning depends on the layout (``RESHAPE``, outputs). Supported:
CONV_2D, DEPTHWISE_CONV_2D (SAME/VALID padding, strides, dilation, fused ReLU/ReLU6), ADD, RELU, RELU6,
PRELU, PAD, MAX_POOL_2D, AVERAGE_POOL_2D, RESHAPE, CONCATENATION, RESIZE_BILINEAR (all three coordinate
conventions), DEQUANTIZE (of constants). Anything else is reported when the file is read, naming the op,
never at run time. Every op is differentiable in the input, so the module can be attacked.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# TFLite BuiltinOperator codes (schema.fbs) of the ops this reader runs.
OPS = {0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 6: "DEQUANTIZE",
       17: "MAX_POOL_2D", 19: "RELU", 21: "RELU6", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 34: "PAD", 54: "PRELU"}
# TensorType -> (struct format, torch dtype)
_TYPES = {0: ("f", torch.float32), 1: ("e", torch.float16), 2: ("i", torch.int32), 3: ("B", torch.uint8),
          4: ("q", torch.int64), 9: ("b", torch.int8)}
_ACT = {0: None, 1: "relu", 3: "relu6"}          # ActivationFunctionType: NONE, RELU, RELU6
_SAME, _VALID = 0, 1                              # Padding


class TFLiteError(ValueError):
    """A file that is not a TFLite model this reader can run; the message names the file and what is wrong."""


class _Table:
    """One FlatBuffer table: fields by index through its vtable."""

    __slots__ = ("buf", "pos", "vt", "vt_len")

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt_len = struct.unpack_from("<H", buf, self.vt)[0]

    def _off(self, i: int) -> int:
        o = 4 + 2 * i
        return struct.unpack_from("<H", self.buf, self.vt + o)[0] if o < self.vt_len else 0

    def scalar(self, i: int, fmt: str, default=0):
        o = self._off(i)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + o)[0] if o else default

    def _ref(self, i: int) -> int | None:
        o = self._off(i)
        if not o:
            return None
        p = self.pos + o
        return p + struct.unpack_from("<I", self.buf, p)[0]

    def table(self, i: int) -> "_Table | None":
        p = self._ref(i)
        return None if p is None else _Table(self.buf, p)

    def tables(self, i: int) -> list["_Table"]:
        p = self._ref(i)
        if p is None:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        return [_Table(self.buf, q + struct.unpack_from("<I", self.buf, q)[0])
                for q in (p + 4 + 4 * k for k in range(n))]

    def vector(self, i: int, fmt: str) -> list:
        p = self._ref(i)
        if p is None:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf, p + 4))

    def bytes(self, i: int) -> bytes:
        p = self._ref(i)
        if p is None:
            return b""
        n = struct.unpack_from("<I", self.buf, p)[0]
        return self.buf[p + 4:p + 4 + n]

    def string(self, i: int) -> str:
        return self.bytes(i).decode("utf-8", "replace")


@dataclass
class _Op:
    kind: str
    inputs: list[int]
    outputs: list[int]
    opts: dict = field(default_factory=dict)


def _options(kind: str, t: _Table | None) -> dict:
    """The builtin options of one op as a dict (schema.fbs field order)."""
    if t is None:
        return {}
    if kind == "CONV_2D":
        return dict(padding=t.scalar(0, "b"), stride=(t.scalar(2, "i", 1), t.scalar(1, "i", 1)),
                    act=t.scalar(3, "b"), dilation=(t.scalar(5, "i", 1), t.scalar(4, "i", 1)))
    if kind == "DEPTHWISE_CONV_2D":
        return dict(padding=t.scalar(0, "b"), stride=(t.scalar(2, "i", 1), t.scalar(1, "i", 1)),
                    multiplier=t.scalar(3, "i", 1), act=t.scalar(4, "b"),
                    dilation=(t.scalar(6, "i", 1), t.scalar(5, "i", 1)))
    if kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        return dict(padding=t.scalar(0, "b"), stride=(t.scalar(2, "i", 1), t.scalar(1, "i", 1)),
                    kernel=(t.scalar(4, "i", 1), t.scalar(3, "i", 1)), act=t.scalar(5, "b"))
    if kind == "ADD":
        return dict(act=t.scalar(0, "b"))
    if kind == "CONCATENATION":
        return dict(axis=t.scalar(0, "i"), act=t.scalar(1, "b"))
    if kind == "RESHAPE":
        return dict(new_shape=t.vector(0, "i"))
    if kind == "RESIZE_BILINEAR":
        return dict(align_corners=bool(t.scalar(2, "b")), half_pixel=bool(t.scalar(3, "b")))
    return {}


def _activation(x: torch.Tensor, act) -> torch.Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "relu6":
        return F.relu6(x)
    return x


def _same_pad(x: torch.Tensor, kernel, stride, dilation, value=0.0) -> torch.Tensor:
    """TensorFlow's SAME padding (the extra pixel, if any, after), applied explicitly."""
    pads = []
    for size, k, s, d in zip(x.shape[2:], kernel, stride, dilation):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (t, b), (l, r) = pads
    return F.pad(x, (l, r, t, b), value=value) if t or b or l or r else x


def _resize_bilinear(x: torch.Tensor, size, align_corners: bool, half_pixel: bool) -> torch.Tensor:
    """TFLite RESIZE_BILINEAR (NCHW), differentiable, with its three source-coordinate conventions."""
    if half_pixel and not align_corners:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if align_corners:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    # legacy TF: src = dst * in / out (no half-pixel shift), clamped to the last pixel
    out = x
    for dim, (n_in, n_out) in zip((2, 3), zip(x.shape[2:], size)):
        src = torch.arange(n_out, device=x.device, dtype=torch.float32) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo.float()).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = n_out
        a, b = out.index_select(dim, lo), out.index_select(dim, hi)
        out = a + (b - a) * frac.view(shape)
    return out


class TFLiteModule(nn.Module):
    """One TFLite subgraph as a torch module: ``forward(x)`` takes the model's input in NHWC (as TFLite does)
    and returns its outputs, each in TFLite's own shape and layout, in the file's output order."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        try:
            buf = self.path.read_bytes()
        except OSError as e:
            raise TFLiteError(f"{self.path}: cannot be read ({e})") from e
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise TFLiteError(f"{self.path} is not a TFLite model (no 'TFL3' identifier at byte 4)")
        try:
            self._read(buf)
        except (struct.error, IndexError, KeyError) as e:
            raise TFLiteError(f"{self.path}: a damaged or unsupported TFLite file ({type(e).__name__}: {e})") from e

    def _read(self, buf: bytes):
        model = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
        codes = []
        for c in model.tables(1):
            code = max(c.scalar(0, "b"), c.scalar(3, "i"))
            codes.append(code)
        graphs = model.tables(2)
        if len(graphs) != 1:
            raise TFLiteError(f"{self.path}: expected one subgraph, found {len(graphs)}")
        buffers = [b.bytes(0) for b in model.tables(4)]
        g = graphs[0]
        tensors = g.tables(0)
        self.shapes = [tuple(t.vector(0, "i")) for t in tensors]
        self.names = [t.string(3) for t in tensors]
        self.inputs, self.outputs = g.vector(1, "i"), g.vector(2, "i")
        consts: dict[int, torch.Tensor] = {}
        for i, t in enumerate(tensors):
            data = buffers[t.scalar(2, "I")] if t.scalar(2, "I") < len(buffers) else b""
            if not data:
                continue
            ttype = t.scalar(1, "b")
            if ttype not in _TYPES:
                raise TFLiteError(f"{self.path}: tensor {self.names[i]!r} has type {ttype}, which is not read here")
            fmt, dtype = _TYPES[ttype]
            n = math.prod(self.shapes[i]) if self.shapes[i] else 1
            values = struct.unpack_from(f"<{n}{fmt}", data, 0)
            consts[i] = torch.tensor(values, dtype=dtype).reshape(self.shapes[i])
        self.ops: list[_Op] = []
        unknown = set()
        for o in g.tables(3):
            code = codes[o.scalar(0, "I")]
            kind = OPS.get(code)
            if kind is None:
                unknown.add(code)
                continue
            opts = _options(kind, o.table(4))
            if opts.get("act", 0) not in _ACT:
                raise TFLiteError(f"{self.path}: a {kind} op has fused activation {opts['act']}, which is not "
                                  f"supported (NONE, RELU, RELU6 are)")
            self.ops.append(_Op(kind, o.vector(1, "i"), o.vector(2, "i"), opts))
        if unknown:
            raise TFLiteError(f"{self.path}: operator code(s) {sorted(unknown)} are not supported by this reader "
                              f"(it runs {sorted(OPS.values())})")
        # DEQUANTIZE of a constant (float16 weights): a float32 constant.
        for op in self.ops:
            if op.kind == "DEQUANTIZE":
                if op.inputs[0] not in consts:
                    raise TFLiteError(f"{self.path}: DEQUANTIZE of a computed tensor is not supported")
                consts[op.outputs[0]] = consts[op.inputs[0]].float()
        self.ops = [op for op in self.ops if op.kind != "DEQUANTIZE"]
        self.counts = {}
        for op in self.ops:
            self.counts[op.kind] = self.counts.get(op.kind, 0) + 1
        # Constants as buffers (they move with .to()), converted once to torch layouts.
        self._const_names: dict[int, str] = {}
        for op in self.ops:
            for j, idx in enumerate(op.inputs):
                if idx < 0 or idx not in consts or idx in self._const_names:
                    continue
                c = consts[idx]
                if op.kind == "CONV_2D" and j == 1:          # OHWI -> OIHW
                    c = c.permute(0, 3, 1, 2)
                elif op.kind == "DEPTHWISE_CONV_2D" and j == 1:  # 1HW(C*m) -> (C*m)1HW
                    c = c.permute(3, 0, 1, 2)
                elif op.kind == "PRELU" and j == 1:           # alpha broadcast over NHWC's trailing dims
                    c = c.reshape(-1)
                name = f"t{idx}"
                self.register_buffer(name, c.contiguous() if c.is_floating_point() else c, persistent=False)
                self._const_names[idx] = name
        for idx in self.inputs:
            if len(self.shapes[idx]) != 4:
                raise TFLiteError(f"{self.path}: input {self.names[idx]!r} is not an NHWC image "
                                  f"(shape {self.shapes[idx]})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The NHWC shape of the (first) input, e.g. (1, 128, 128, 3)."""
        return self.shapes[self.inputs[0]]

    def _value(self, env: dict, idx: int):
        if idx in env:
            return env[idx]
        return getattr(self, self._const_names[idx])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        want = self.input_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(want[1:]):
            raise ValueError(f"{self.path.name} takes NHWC input of shape (N, {want[1]}, {want[2]}, {want[3]}), "
                             f"got {tuple(x.shape)}")
        env: dict[int, torch.Tensor] = {self.inputs[0]: x.permute(0, 3, 1, 2)}  # NCHW inside
        for op in self.ops:
            env[op.outputs[0]] = self._run(op, env)
        return [self._nhwc(env[i]) for i in self.outputs]

    @staticmethod
    def _nhwc(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1) if t.dim() == 4 else t

    def _run(self, op: _Op, env: dict) -> torch.Tensor:
        k, o = op.kind, op.opts
        ins = [self._value(env, i) if i >= 0 else None for i in op.inputs]
        x = ins[0]
        if k in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w, b = ins[1], (ins[2] if len(ins) > 2 else None)
            if o["padding"] == _SAME:
                x = _same_pad(x, w.shape[2:], o["stride"], o["dilation"])
            groups = x.shape[1] if k == "DEPTHWISE_CONV_2D" else 1
            y = F.conv2d(x, w, b, stride=o["stride"], dilation=o["dilation"], groups=groups)
            return _activation(y, _ACT[o["act"]])
        if k in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            if k == "MAX_POOL_2D":
                if o["padding"] == _SAME:
                    x = _same_pad(x, o["kernel"], o["stride"], (1, 1), value=-math.inf)
                y = F.max_pool2d(x, o["kernel"], o["stride"])
            else:
                if o["padding"] == _SAME and any(s > 1 for s in o["kernel"]):
                    raise TFLiteError(f"{self.path}: AVERAGE_POOL_2D with SAME padding is not supported")
                y = F.avg_pool2d(x, o["kernel"], o["stride"])
            return _activation(y, _ACT[o["act"]])
        if k == "ADD":
            y = ins[1]
            return _activation(x + (self._bcast(y, x) if op.inputs[1] in self._const_names else y), _ACT[o["act"]])
        if k == "RELU":
            return F.relu(x)
        if k == "RELU6":
            return F.relu6(x)
        if k == "PRELU":
            a = ins[1]
            if x.dim() == 4:
                a = a.reshape(1, -1, 1, 1) if a.numel() == x.shape[1] else self._bcast(
                    a.reshape(self.shapes[op.inputs[1]]), x)
            return torch.where(x >= 0, x, x * a)
        if k == "PAD":
            p = ins[1].tolist()            # (rank, 2) before/after per NHWC dim
            if x.dim() == 4:
                p = [p[0], p[3], p[1], p[2]]   # -> NCHW order
            flat = [v for pair in reversed(p) for v in pair]
            return F.pad(x, flat)
        if k == "RESHAPE":
            shape = [int(v) for v in (ins[1].tolist() if len(ins) > 1 and ins[1] is not None else o["new_shape"])]
            y = self._nhwc(x).reshape(shape)
            return y.permute(0, 3, 1, 2) if y.dim() == 4 else y
        if k == "CONCATENATION":
            axis = o["axis"] % x.dim()
            if x.dim() == 4:
                axis = (0, 2, 3, 1)[axis]
            return _activation(torch.cat(ins, axis), _ACT[o["act"]])
        if k == "RESIZE_BILINEAR":
            return _resize_bilinear(x, [int(v) for v in ins[1].tolist()], o["align_corners"], o["half_pixel"])
        raise TFLiteError(f"{self.path}: op {k} reached the interpreter without a rule")  # guarded at load

    @staticmethod
    def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A constant in TFLite's NHWC broadcasting, laid out for an NCHW activation."""
        if x.dim() != 4 or c.dim() == 0:
            return c
        c = c.reshape((1,) * (4 - c.dim()) + tuple(c.shape))
        return c.permute(0, 3, 1, 2)
