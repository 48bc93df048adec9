"""lower_to_int8: the calibrated fake-quant graph -> the reference int8 graph (ONNX QDQ semantics).

before:  %x_fq = call_module[x_fq](%x)                       # FakeQuantize
         %conv1 = call_module[conv1](%x_fq)                   # ConvAct2d(act="relu") with weight_fq
         %conv1_fq = call_module[conv1_fq](%conv1)
after:   %x_fq = quantize(%x, x_fq_scale, x_fq_zero_point, 0, 255)          -> uint8 tensor
         %x_fq_dq = dequantize(%x_fq, ...)                                   -> float
         %conv1_w_dq = dequantize(conv1_w_i8, conv1_w_scale, conv1_w_zp, 0)  # int8 weight, per channel
         %conv1_b_dq = dequantize(conv1_b_i32, conv1_b_scale, 0, 0)          # int32 bias, scale s_x * s_w
         %conv1_conv = F.conv2d(%x_fq_dq, %conv1_w_dq, %conv1_b_dq, ...)
         %conv1 = F.relu(%conv1_conv)
         %conv1_fq = quantize(%conv1, ...); %conv1_fq_dq = dequantize(%conv1_fq, ...)

Node names survive: the op keeps its name, the fake-quant's name goes to its QuantizeLinear.
The output of a shared-qparam op (maxpool, flatten) gets a Q/DQ pair on its source's qparams,
an identity on values already on that grid, so the runtime sees the op between DQ and Q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.meta import KEY, info, qparams_source
from fxquant.nn import ConvAct, EmbeddingQ, FakeQuantize, LinearAct, WeightedAct
from fxquant.numerics import dequantize, quantize

ACT_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6}


class _Builder:
    """Adds buffers and nodes to `gm` under names derived from the node being lowered."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.graph = gm, gm.graph

    def const(self, name: str, tensor: torch.Tensor) -> fx.Node:
        if not hasattr(self.gm, name):
            self.gm.register_buffer(name, tensor.detach().clone())
        return self.graph.get_attr(name)

    def call(self, name: str, fn, *args) -> fx.Node:
        return self.graph.create_node("call_function", fn, args, {}, name=name)


def _check_calibrated(node: fx.Node, fq: FakeQuantize) -> None:
    if not fq.calibrated:
        raise FxQuantError(
            f"convert: fake-quant node '{node.name}' has seen no data, so it has no scale. "
            "Calibrate first: quantize(..., calib_data=...) or fxquant.calibrate(qmodel, data)."
        )


def _explicit_pad(b: _Builder, node: fx.Node, module: ConvAct, source_node: fx.Node | None) -> fx.Node:
    """A conv with padding_mode reflect / replicate / circular pads its input itself (nn.Conv2d's
    _conv_forward); lowered, that is an explicit F.pad before a conv with padding 0:
        %conv1_pad = F.pad(%x_fq_dq, [l, r, t, b], mode)   -> a Pad (reflect/edge) or Slice+Concat (circular)
        %conv1_pad_fq = quantize(%conv1_pad, <the input's qparams>);  %conv1_pad_fq_dq = dequantize(...)
    The padded values are copies of input values, so they sit on the input's grid: the Q/DQ pair after the
    pad is exact, and the conv reads DQ -> Conv as the runtime's integer conv wants."""
    x = node.args[0]
    pad = b.call(f"{node.name}_pad", F.pad, x, list(module._reversed_padding_repeated_twice), module.padding_mode)
    if source_node is None:
        return pad
    source = b.gm.get_submodule(source_node.target)
    spec = source.spec
    scale, zp = (b.const(f"{source_node.name}_{what}", t) for what, t in zip(("scale", "zero_point"), source.qparams()))
    q = b.call(f"{node.name}_pad_fq", quantize, pad, scale, zp, spec.qmin, spec.qmax, spec.axis, spec.dtype)
    return b.call(f"{q.name}_dq", dequantize, q, scale, zp, spec.axis)


def _lower_weighted(b: _Builder, node: fx.Node, module: WeightedAct, source_node: fx.Node | None) -> None:
    """The weighted module's call becomes conv2d / linear of int8 weight and int32 bias dequantized;
    `source_node` is the fake-quant whose grid its input is on (None: a float input)."""
    source = b.gm.get_submodule(source_node.target) if source_node is not None else None
    spec = module.weight_fq.spec
    w_int, w_scale, w_zp, float_bias = module.lowered()  # the forward's qparams; ConvBnAct2d: the BN folded in
    with b.graph.inserting_before(node):
        x, padding = node.args[0], getattr(module, "padding", 0)
        if isinstance(module, ConvAct) and module.padding_mode != "zeros":  # first: the bias scale reads the pad's s_x
            x, padding = _explicit_pad(b, node, module, source_node), 0
        w_i8 = b.const(f"{node.name}_w_i8", w_int)
        w = b.call(f"{node.name}_w_dq", dequantize, w_i8, b.const(f"{node.name}_w_scale", w_scale),
                   b.const(f"{node.name}_w_zp", w_zp), spec.axis)
        info(w).weight = spec  # export_onnx stores the integers in the narrowest type that holds [qmin, qmax]
        bias, b_spec = None, node.meta[KEY].bias  # None: the backend reads a float bias (TensorRT)
        if float_bias is not None and source is not None and b_spec is not None:
            b_scale = source.qparams()[0] * w_scale  # s_b = s_x * s_w
            b_i32 = quantize(float_bias, b_scale, torch.zeros_like(b_scale), b_spec.qmin, b_spec.qmax, 0, b_spec.dtype)
            bias = b.call(f"{node.name}_b_dq", dequantize, b.const(f"{node.name}_b_i32", b_i32),
                          b.const(f"{node.name}_b_scale", b_scale), b.const(f"{node.name}_b_zp", torch.zeros_like(b_scale)), 0)
        elif float_bias is not None:
            bias = b.const(f"{node.name}_bias", float_bias)
        if isinstance(module, EmbeddingQ):  # int8 table -> DequantizeLinear -> Gather
            fn, args = F.embedding, (node.args[0], w)
        elif isinstance(module, ConvAct):
            fn, args = module.conv_function, (x, w, bias, module.stride, padding, module.dilation, module.groups)
        else:
            fn, args = F.linear, (node.args[0], w, bias)
        core = b.call(f"{node.name}_{fn.__name__}", fn, *args) if module.act else None
    if core is None:
        node.op, node.target, node.args, node.kwargs = "call_function", fn, args, {}
    else:
        node.op, node.target, node.args, node.kwargs = "call_function", ACT_FUNCTIONS[module.act], (core,), {}


def _add_dequantize(b: _Builder, q: fx.Node, readers_of: fx.Node, scale: fx.Node, zp: fx.Node, spec) -> None:
    """After quantize node `q`: its dequantize, which every user of `readers_of` (but q) now reads."""
    with b.graph.inserting_after(q):
        dq = b.call(f"{q.name}_dq", dequantize, q, scale, zp, spec.axis)
    readers_of.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q and user is not dq)


def _lower_fake_quant(b: _Builder, node: fx.Node, fq: FakeQuantize) -> None:
    """The FakeQuantize node becomes the quantize node (same name), a dequantize follows it."""
    _check_calibrated(node, fq)
    (value,) = node.args
    with b.graph.inserting_before(node):
        scale, zp = (b.const(f"{node.name}_{what}", t) for what, t in zip(("scale", "zero_point"), fq.qparams()))
    spec = fq.spec
    node.op, node.target, node.kwargs = "call_function", quantize, {}
    node.args = (value, scale, zp, spec.qmin, spec.qmax, spec.axis, spec.dtype)
    _add_dequantize(b, node, node, scale, zp, spec)  # the fake-quant's readers; float readers of value keep it


def _lower_shared(b: _Builder, node: fx.Node, source: str, spec) -> None:
    """A shared-qparam op's output gets quantize/dequantize on the buffers of fake-quant `source`."""
    with b.graph.inserting_before(node.next):  # new nodes land in creation order
        scale, zp = b.graph.get_attr(f"{source}_scale"), b.graph.get_attr(f"{source}_zero_point")
        q = b.call(f"{node.name}_fq", quantize, node, scale, zp, spec.qmin, spec.qmax, spec.axis, spec.dtype)
    _add_dequantize(b, q, node, scale, zp, spec)


def lower_to_int8(gm: fx.GraphModule) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    if any(KEY not in n.meta for n in nodes):
        raise FxQuantError(
            "convert: this graph has lost fxquant's annotations (node.meta does not survive pickling a "
            "GraphModule). Rebuild it with fxquant.quantize(...) and load_state_dict() your checkpoint into it."
        )
    modules = {n: gm.get_submodule(n.target) for n in nodes if n.op == "call_module"}
    cache = {}
    sources = {n: qparams_source(gm, n, cache) for n in nodes}  # value -> the fake-quant node it is on
    b = _Builder(gm)
    for node in nodes:
        module = modules.get(node)
        if isinstance(module, (ConvAct, LinearAct, EmbeddingQ)) and module.weight_fq is not None:
            source = sources[node.args[0]]
            if source is not None:
                _check_calibrated(source, modules[source])
            _lower_weighted(b, node, module, source)
    for node in nodes:
        module = modules.get(node)
        if isinstance(module, FakeQuantize):
            _lower_fake_quant(b, node, module)
        elif node.meta[KEY].share and sources[node] is not None:
            _lower_shared(b, node, sources[node].name, modules[sources[node]].spec)
    gm.delete_all_unused_submodules()
    return gm
