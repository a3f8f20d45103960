"""A small ONNX interpreter in torch: runs a convolutional detector's graph differentiably.

onnxruntime gives no gradients, and an ``onnxruntime`` wheel beside a user's ``onnxruntime-gpu`` is the
ecosystem's most reported face-pack breakage; the pack therefore runs insightface's SCRFD graphs
itself. The graph is evaluated node by node in topological order (ONNX guarantees the order), each
op mapped to its torch equivalent. Only what convolutional detectors use is supported: convolutions,
normalisation, activations, pooling, resizing, element-wise arithmetic and the shape plumbing
(Shape, Gather, Slice, Concat, Reshape...) that exporters emit for dynamic input sizes. Shape values
are kept as int64 tensors and turned into Python ints where an op needs sizes, so a graph exported
with dynamic axes runs at any input size.

An unsupported op is reported when the graph is loaded, with its name, never at run time.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")

# ONNX TensorProto element types -> torch dtypes (those Cast meets in detectors)
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float16, 11: torch.float64}


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads2d(pads, x, value=0.0):
    """ONNX pads [top, left, bottom, right] applied explicitly when asymmetric; returns (x, symmetric pads)."""
    if not pads:
        return x, (0, 0)
    t, l, b, r = pads
    if (t, l) == (b, r):
        return x, (t, l)
    return F.pad(x, (l, r, t, b), value=value), (0, 0)


def _conv(n, x, w, b=None):
    a = n.attrs
    x, pad = _pads2d(a.get("pads"), x)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"Conv {n.name}: auto_pad is not supported")
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", (1, 1))), padding=pad,
                    dilation=tuple(a.get("dilations", (1, 1))), groups=a.get("group", 1))


def _pool(n, x, kind):
    a = n.attrs
    k = tuple(a["kernel_shape"])
    s = tuple(a.get("strides", (1, 1)))
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        x, pad = _pads2d(a.get("pads"), x, value=-math.inf)
        return F.max_pool2d(x, k, s, pad, ceil_mode=ceil)
    include = bool(a.get("count_include_pad", 0))
    pads = a.get("pads")
    if pads and (pads[0], pads[1]) != (pads[2], pads[3]):
        x, pad = F.pad(x, (pads[1], pads[3], pads[0], pads[2])), (0, 0)
    else:
        x, pad = _pads2d(pads, x)
    return F.avg_pool2d(x, k, s, pad, ceil_mode=ceil, count_include_pad=include)


def _resize(n, x, roi=None, scales=None, sizes=None):
    a = n.attrs
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    elif scales is not None and scales.numel():
        sc = scales.tolist()[2:]
        size = [int(math.floor(d * s)) for d, s in zip(x.shape[2:], sc)]
    else:
        raise ValueError(f"Resize {n.name}: neither scales nor sizes")
    if mode == "nearest":
        # asymmetric + floor is torch's "nearest"; what exporters write for an integer upsampling
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=ctm == "align_corners")
    raise ValueError(f"Resize {n.name}: mode {mode!r} is not supported")


def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    a = n.attrs
    starts = _ints(starts) if starts is not None else a["starts"]
    ends = _ints(ends) if ends is not None else a["ends"]
    axes = _ints(axes) if axes is not None else a.get("axes", list(range(len(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        d = x.shape[ax]
        s = max(0, min(d, s + d if s < 0 else s))
        e = max(0, min(d, e + d if e < 0 else e))
        if st < 0:
            raise ValueError(f"Slice {n.name}: negative steps are not supported")
        idx[ax] = slice(s, e, st)
    return x[tuple(idx)]


def _reshape(n, x, shape):
    shape = _ints(shape)
    if not n.attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _unsqueeze(n, x, axes=None):
    axes = _ints(axes) if axes is not None else n.attrs["axes"]
    out_dim = x.dim() + len(axes)
    for ax in sorted(a + out_dim if a < 0 else a for a in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(n, x, axes=None):
    axes = _ints(axes) if axes is not None else n.attrs.get("axes")
    if axes is None:
        return x.squeeze()
    for ax in sorted((a + x.dim() if a < 0 else a for a in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _clip(n, x, lo=None, hi=None):
    lo = float(lo) if lo is not None else n.attrs.get("min", -math.inf)
    hi = float(hi) if hi is not None else n.attrs.get("max", math.inf)
    return x.clamp(lo, hi)


def _const_of_shape(n, shape):
    value = n.attrs.get("value")
    v = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return torch.full(_ints(shape), v.item(), dtype=v.dtype)


OPS = {
    "Conv": _conv,
    "BatchNormalization": lambda n, x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0,
                                                                n.attrs.get("epsilon", 1e-5)),
    "Relu": lambda n, x: F.relu(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, n.attrs.get("alpha", 0.01)),
    "PRelu": lambda n, x, s: torch.where(x >= 0, x, x * (s.view(1, -1, 1, 1) if s.dim() == 1 and x.dim() == 4 else s)),
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Exp": lambda n, x: torch.exp(x),
    "Tanh": lambda n, x: torch.tanh(x),
    "Floor": lambda n, x: torch.floor(x),
    "Sqrt": lambda n, x: torch.sqrt(x),
    "Neg": lambda n, x: -x,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b,
    "MaxPool": lambda n, x: _pool(n, x, "max"),
    "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "GlobalAveragePool": lambda n, x: x.mean(dim=(2, 3), keepdim=True),
    "Resize": _resize,
    "Upsample": lambda n, x, scales: _resize(n, x, None, scales, None),
    "Concat": lambda n, *xs: torch.cat([x for x in xs if x is not None], n.attrs["axis"]),
    "Reshape": _reshape,
    "Transpose": lambda n, x: x.permute(*n.attrs.get("perm", list(range(x.dim()))[::-1])),
    "Flatten": lambda n, x: x.reshape(int(math.prod(x.shape[:n.attrs.get("axis", 1)])), -1),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": lambda n, x: torch.tensor(list(x.shape), dtype=torch.int64),
    "Gather": lambda n, x, i: torch.index_select(x, n.attrs.get("axis", 0), i.reshape(-1).long()).reshape(
        *x.shape[:n.attrs.get("axis", 0)], *i.shape, *x.shape[n.attrs.get("axis", 0) + 1:]),
    "Slice": _slice,
    "Cast": lambda n, x: x.to(_DTYPES[n.attrs["to"]]),
    "Tile": lambda n, x, r: x.repeat(*_ints(r)),
    "Expand": lambda n, x, s: x * torch.ones(_ints(s), dtype=x.dtype, device=x.device),
    "Identity": lambda n, x: x,
    "Softmax": lambda n, x: torch.softmax(x, n.attrs.get("axis", -1)),
    "Clip": _clip,
    "ConstantOfShape": _const_of_shape,
}


class _Node:
    __slots__ = ("name", "op", "inputs", "outputs", "attrs")

    def __init__(self, proto):
        from onnx import helper, numpy_helper
        self.name = proto.name or proto.output[0]
        self.op = proto.op_type
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {}
        for a in proto.attribute:
            v = helper.get_attribute_value(a)
            if a.type == a.TENSOR:
                v = torch.from_numpy(numpy_helper.to_array(v).copy())
            self.attrs[a.name] = v


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module: ``forward(x)`` returns the graph's outputs as a list.

    ``no_sigmoid``: names of Sigmoid nodes to skip (they then pass their input through), used to read
    a detector's score logits instead of its saturating probabilities.
    """

    def __init__(self, model, source: str = "ONNX graph"):
        super().__init__()
        from onnx import numpy_helper
        g = model.graph
        self.source = source
        consts = {}
        for init in g.initializer:
            consts[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
        self.nodes = []
        for proto in g.node:
            n = _Node(proto)
            if n.op == "Constant":
                consts[n.outputs[0]] = n.attrs["value"] if "value" in n.attrs else torch.tensor(
                    n.attrs.get("value_float", n.attrs.get("value_int", 0)))
                continue
            self.nodes.append(n)
        unsupported = sorted({n.op for n in self.nodes if n.op not in OPS})
        if unsupported:
            raise ValueError(f"{source}: ONNX op(s) {unsupported} are not supported by the pack's torch runner "
                             f"(it runs convolutional detectors such as insightface's SCRFD)")
        # float constants become buffers (they follow .to(device)); integer ones stay plain shape data
        self._names = {}
        for i, (name, t) in enumerate(consts.items()):
            key = f"c{i}"
            self.register_buffer(key, t, persistent=False)
            self._names[name] = key
        inputs = [i for i in g.input if i.name not in consts]
        self.input_names = [i.name for i in inputs]
        self.input_shapes = [[d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in i.type.tensor_type.shape.dim] for i in inputs]
        self.output_names = [o.name for o in g.output]
        self.no_sigmoid: set[str] = set()
        self.producer = {o: n for n in self.nodes for o in n.outputs}

    def sigmoid_before(self, output: str) -> _Node | None:
        """The Sigmoid node that feeds ``output`` through layout-only ops, if any."""
        n = self.producer.get(output)
        while n is not None and n.op in _LAYOUT_OPS:
            n = self.producer.get(n.inputs[0])
        return n if n is not None and n.op == "Sigmoid" else None

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        env = {name: getattr(self, key) for name, key in self._names.items()}
        env.update(zip(self.input_names, xs))
        for n in self.nodes:
            args = [env[i] if i else None for i in n.inputs]
            if n.op == "Sigmoid" and n.name in self.no_sigmoid:
                out = args[0]
            else:
                try:
                    out = OPS[n.op](n, *args)
                except Exception as e:
                    raise ValueError(f"{self.source}: node {n.name} ({n.op}) failed: {type(e).__name__}: {e}") from e
            if isinstance(out, torch.Tensor):
                env[n.outputs[0]] = out
            else:
                env.update(zip(n.outputs, out))
        return [env[o] for o in self.output_names]


def load_onnx_module(path: str | Path) -> OnnxModule:
    """Parse an ONNX file (needs the ``onnx`` package) into an :class:`OnnxModule`."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("reading ONNX detectors needs the 'onnx' package: pip install onnx") from e
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # DecodeError and friends
        raise ValueError(f"{path} could not be opened as an ONNX model: {type(e).__name__}: {str(e)[:300]}") from e
    return OnnxModule(model, str(path)).eval()
