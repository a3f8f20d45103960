"""ArcFace IResNet (insightface ``arcface_torch``) rebuilt in PyTorch from an insightface ONNX file.

insightface's model packs ship their recognizer only as ONNX (``w600k_r50.onnx`` in buffalo_l,
``glintr100.onnx`` in antelopev2). onnxruntime gives no gradients, so the network is rebuilt
here as a torch module and the ONNX initializers are copied into it.

How ONNX weights map onto the module (by graph structure, not by tensor names, which the
exporter renames): the graph is walked along the data flow from its input.

* optional ``Sub``/``Mul``/``Div`` by constants at the input: the graph's own normalisation,
  kept as ``input_shift``/``input_scale`` (else ArcFace's ``(255 x - 127.5) / 127.5``);
* stem: ``Conv`` [+ ``BatchNormalization``] + ``PRelu`` -> ``conv1`` (BN folded into it), ``prelu``;
* a tensor with two consumers starts a residual block: the ``BatchNormalization`` consumer is
  the block's ``bn1``, followed by ``Conv`` [+BN] -> ``PRelu`` -> ``Conv`` [+BN] (``conv1``,
  ``prelu``, ``conv2``) into an ``Add``; the other consumer is either that ``Add`` (identity)
  or a ``Conv`` [+BN] (``downsample``);
* a tensor with one ``BatchNormalization`` consumer starts the head: ``bn2`` ->
  [``Dropout``] -> ``Flatten``/``Reshape`` -> ``Gemm`` (or ``MatMul`` [+ ``Add``]) -> ``fc`` ->
  ``BatchNormalization`` -> ``features``.

PyTorch's exporter folds every BatchNorm that follows a conv into the conv, so convs here
always carry a bias; an unfolded Conv->BN pair is folded at load time. Depth (r18/r34/r50/r100/
r200) and widths come from the graph, so any IResNet loads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .align import ARCFACE_TEMPLATE_112
from .base import Recognizer


class IBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, downsample: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1)
        self.downsample = nn.Conv2d(cin, cout, 1, stride) if downsample else None

    def forward(self, x):
        out = self.conv2(self.prelu(self.conv1(self.bn1(x))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """IResNet with BatchNorms after convs folded: stem, residual blocks, bn2 -> fc -> features."""

    def __init__(self, block_specs: list[tuple[int, int, int, bool]], stem_out: int, fc_in: int, emb: int):
        super().__init__()
        self.register_buffer("input_shift", torch.zeros(1, 3, 1, 1))
        self.register_buffer("input_scale", torch.ones(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, stem_out, 3, 1, 1)
        self.prelu = nn.PReLU(stem_out)
        self.blocks = nn.Sequential(*[IBlock(*s) for s in block_specs])
        last = block_specs[-1][1] if block_specs else stem_out
        self.bn2 = nn.BatchNorm2d(last)
        self.fc = nn.Linear(fc_in, emb)
        self.features = nn.BatchNorm1d(emb)

    def forward(self, x):  # x: RGB in [0, 255]
        x = (x - self.input_shift) * self.input_scale
        x = self.bn2(self.blocks(self.prelu(self.conv1(x))))
        return self.features(self.fc(x.flatten(1)))


class _Graph:
    """Just enough ONNX graph navigation for the structural walk."""

    def __init__(self, model, source: str):
        from onnx import numpy_helper
        self.source = source
        g = model.graph
        self.init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in g.initializer}
        for n in g.node:  # Constant nodes hold weights too in some exports
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.init[n.output[0]] = torch.from_numpy(numpy_helper.to_array(a.t).copy())
        self.nodes = [n for n in g.node if n.op_type != "Constant"]
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        inputs = [i for i in g.input if i.name not in self.init]
        if len(inputs) != 1:
            self.fail(f"expected one image input, found {len(inputs)}")
        self.input = inputs[0]
        self.output = g.output[0].name if g.output else None

    def fail(self, why: str):
        raise ValueError(f"{self.source} is not an ArcFace IResNet recognizer ONNX ({why}); expected an "
                         f"insightface recognition model such as w600k_r50.onnx or glintr100.onnx")

    def next(self, t: str, ops: tuple[str, ...]):
        cons = self.consumers.get(t, [])
        if len(cons) != 1 or cons[0].op_type not in ops:
            self.fail(f"after tensor {t!r} expected one of {ops}, found {[c.op_type for c in cons]}")
        return cons[0]

    def const(self, name: str) -> torch.Tensor:
        if name not in self.init:
            self.fail(f"tensor {name!r} is not a constant")
        return self.init[name].float()

    @staticmethod
    def attr(node, name, default=None):
        from onnx import helper
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _bn_params(g: _Graph, node) -> dict:
    scale, bias, mean, var = (g.const(n) for n in node.input[1:5])
    return {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var,
            "eps": float(g.attr(node, "epsilon", 1e-5))}


def _conv(g: _Graph, node) -> tuple[str, dict]:
    """A Conv node (and a BatchNormalization right after it, folded in) -> (output, params)."""
    w = g.const(node.input[1])
    b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else torch.zeros(w.shape[0])
    if (g.attr(node, "group", 1) or 1) != 1:
        g.fail(f"grouped convolution {node.name}")
    stride = (g.attr(node, "strides") or [1, 1])[0]
    out = node.output[0]
    cons = g.consumers.get(out, [])
    if len(cons) == 1 and cons[0].op_type == "BatchNormalization":
        bn = _bn_params(g, cons[0])
        k = bn["weight"] / torch.sqrt(bn["running_var"] + bn["eps"])
        w = w * k[:, None, None, None]
        b = (b - bn["running_mean"]) * k + bn["bias"]
        out = cons[0].output[0]
    return out, {"weight": w, "bias": b, "stride": stride}


def _set_bn(module: nn.BatchNorm2d | nn.BatchNorm1d, p: dict):
    module.eps = p["eps"]
    for k in ("weight", "bias", "running_mean", "running_var"):
        getattr(module, k).data.copy_(p[k].reshape(-1))


def _set_conv(module: nn.Conv2d, p: dict):
    module.weight.data.copy_(p["weight"])
    module.bias.data.copy_(p["bias"])


def iresnet_from_onnx(path: str | Path) -> IResNet:
    """Build an IResNet from an insightface recognition ONNX file (see the module doc for the mapping)."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("reading insightface ONNX recognizers needs the 'onnx' package: pip install onnx") from e
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends
        raise ValueError(f"{path} is not a readable ONNX file: {type(e).__name__}: {e}") from e
    g = _Graph(model, str(path))
    dims = [d.dim_value for d in g.input.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (0, 3) or dims[2] not in (0, 112) or dims[3] not in (0, 112):
        g.fail(f"input shape {dims} is not (N, 3, 112, 112)")

    cur = g.input.name
    shift, scale = torch.zeros(3), torch.ones(3)
    node = g.next(cur, ("Sub", "Mul", "Div", "Conv"))
    while node.op_type in ("Sub", "Mul", "Div"):  # normalisation inside the graph
        c = g.const(node.input[1]).reshape(-1)
        if node.op_type == "Sub":
            shift = shift + c / scale
        elif node.op_type == "Mul":
            scale = scale * c
        else:
            scale = scale / c
        cur = node.output[0]
        node = g.next(cur, ("Sub", "Mul", "Div", "Conv"))
    in_graph_norm = not (torch.all(shift == 0) and torch.all(scale == 1))

    cur, stem = _conv(g, node)
    prelu = g.next(cur, ("PRelu",))
    stem_slope = g.const(prelu.input[1]).reshape(-1)
    cur = prelu.output[0]

    blocks = []
    while True:
        cons = g.consumers.get(cur, [])
        if len(cons) == 2:
            bn = next((c for c in cons if c.op_type == "BatchNormalization"), None)
            other = next((c for c in cons if c is not bn), None)
            if bn is None:
                g.fail(f"residual block at {cur!r} does not start with BatchNormalization")
            blk = {"bn1": _bn_params(g, bn)}
            t, blk["conv1"] = _conv(g, g.next(bn.output[0], ("Conv",)))
            pr = g.next(t, ("PRelu",))
            blk["prelu"] = g.const(pr.input[1]).reshape(-1)
            t, blk["conv2"] = _conv(g, g.next(pr.output[0], ("Conv",)))
            add = g.next(t, ("Add",))
            if other.op_type == "Conv":
                ds_out, blk["downsample"] = _conv(g, other)
                if g.next(ds_out, ("Add",)) is not add:
                    g.fail("downsample branch does not meet its block's Add")
            elif other is not add:
                g.fail(f"unexpected {other.op_type} beside a residual block")
            blocks.append(blk)
            cur = add.output[0]
        elif len(cons) == 1 and cons[0].op_type == "BatchNormalization":
            break
        else:
            g.fail(f"tensor {cur!r} feeds {[c.op_type for c in cons]}")
    if not blocks:
        g.fail("no residual blocks")

    bn2 = g.next(cur, ("BatchNormalization",))
    bn2_p = _bn_params(g, bn2)
    node = g.next(bn2.output[0], ("Dropout", "Flatten", "Reshape"))
    if node.op_type == "Dropout":
        node = g.next(node.output[0], ("Flatten", "Reshape"))
    node = g.next(node.output[0], ("Gemm", "MatMul"))
    if node.op_type == "Gemm":
        w = g.const(node.input[1])
        if not g.attr(node, "transB", 0):
            w = w.T
        b = g.const(node.input[2]) if len(node.input) > 2 else torch.zeros(w.shape[0])
        cur = node.output[0]
    else:
        w = g.const(node.input[1]).T
        cur = node.output[0]
        nxt = g.consumers.get(cur, [])
        if len(nxt) == 1 and nxt[0].op_type == "Add":
            b = g.const(nxt[0].input[1])
            cur = nxt[0].output[0]
        else:
            b = torch.zeros(w.shape[0])
    feat = g.next(cur, ("BatchNormalization",))
    feat_p = _bn_params(g, feat)

    specs = [(blk["conv1"]["weight"].shape[1], blk["conv1"]["weight"].shape[0], blk["conv2"]["stride"],
              "downsample" in blk) for blk in blocks]
    net = IResNet(specs, stem["weight"].shape[0], w.shape[1], w.shape[0])
    try:
        if in_graph_norm:
            net.input_shift.copy_(shift.expand(3).reshape(1, 3, 1, 1))
            net.input_scale.copy_(scale.expand(3).reshape(1, 3, 1, 1))
        else:  # insightface feeds these models (x - 127.5) / 127.5
            net.input_shift.fill_(127.5)
            net.input_scale.fill_(1 / 127.5)
        _set_conv(net.conv1, stem)
        net.prelu.weight.data.copy_(stem_slope)
        for mod, blk in zip(net.blocks, blocks):
            _set_bn(mod.bn1, blk["bn1"])
            _set_conv(mod.conv1, blk["conv1"])
            mod.prelu.weight.data.copy_(blk["prelu"])
            _set_conv(mod.conv2, blk["conv2"])
            if mod.downsample is not None:
                _set_conv(mod.downsample, blk["downsample"])
        _set_bn(net.bn2, bn2_p)
        net.fc.weight.data.copy_(w)
        net.fc.bias.data.copy_(b)
        _set_bn(net.features, feat_p)
    except RuntimeError as e:  # a shape that does not fit the structure
        g.fail(f"weights do not fit the structure: {e}")
    with torch.no_grad():  # checks that the spatial size reaching fc is consistent (7x7 for 112 input)
        try:
            net.eval()(torch.zeros(1, 3, 112, 112))
        except RuntimeError as e:
            g.fail(f"the network does not run on a 112x112 input: {e}")
    return net.eval().requires_grad_(False)


class ArcFaceRecognizer(Recognizer):
    """IResNet behind the Recognizer interface: aligned 112x112 [0, 1] RGB crops -> embeddings."""

    metric = "cosine"
    # insightface's own verification uses cosine similarity; ~0.3-0.4 similarity separates
    # identities for w600k/glint models (IJB-C, LFW): distance 1 - cos < 0.68 <=> similarity > 0.32.
    threshold = 0.68
    crop_size = 112

    def __init__(self, net: IResNet, name: str = "arcface"):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name

    def template(self) -> torch.Tensor:
        return ARCFACE_TEMPLATE_112.clone()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops * 255.0)


def onnx_embed(path: str | Path, crops: torch.Tensor) -> torch.Tensor:
    """Reference embeddings from onnxruntime for aligned [0, 1] RGB crops (B, 3, 112, 112).

    Applies insightface's preprocessing (``(255 x - 127.5) / 127.5`` unless the graph
    normalises itself), for parity checks.
    """
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = crops.detach().float().cpu() * 255.0
    first = {n.op_type for n in _first_ops(path)}
    if not first & {"Sub", "Mul", "Div"}:
        x = (x - 127.5) / 127.5
    inp = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {inp: x.numpy()})[0])


def _first_ops(path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return [n for n in m.graph.node if n.op_type != "Constant"][:2]
