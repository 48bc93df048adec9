"""export_onnx: write the reference int8 graph (or a float model) as ONNX, one FX node at a time.

The int8 graph maps one to one onto ONNX QDQ:
    get_attr w_i8 (int8)     -> an int8 initializer           (weights are never float in the file)
    dequantize(w_i8, s, zp)  -> DequantizeLinear(axis=0)
    quantize(x, s, zp)       -> QuantizeLinear
    F.conv2d / F.linear      -> Conv / Gemm (or MatMul), between DequantizeLinear and QuantizeLinear
Every ONNX node is named after the FX node it comes from, so layers line up by name across the
fake-quant model, the reference int8 model and the file. Ops without a row in CONVERTERS raise an
FxQuantError naming the node. The file is written atomically: on any failure nothing is left at `path`.
"""

from __future__ import annotations

import operator
import os
import tempfile
from functools import partial

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.numerics import dequantize, quantize

MIN_OPSET, MAX_OPSET = 13, 21
ONNX_DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8,
    torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
}
STORAGE = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32}


class Value(str):
    """The name of an ONNX value (a tensor in the graph), as opposed to a Python constant."""


class _Emitter:
    """Accumulates ONNX nodes and initializers while the FX graph is walked in order."""

    def __init__(self, gm: fx.GraphModule, values: dict):
        self.gm, self.concrete = gm, values  # concrete: fx node -> value from running example inputs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.names: dict[fx.Node, object] = {}  # fx node -> Value or a Python constant

    def init(self, name: str, array) -> Value:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return Value(name)

    def const(self, node: fx.Node, array, suffix: str) -> Value:
        return self.init(f"{node.name}/{suffix}", array)

    def op(self, node: fx.Node, op_type: str, inputs, suffix: str = "", **attrs) -> Value:
        """Emit one ONNX node; the last one for an FX node takes that node's name as its output."""
        name = f"{node.name}/{suffix}" if suffix else node.name
        out = Value(name)
        inputs = ["" if i is None else i for i in inputs]
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **{k: v for k, v in attrs.items() if v is not None}))
        return out

    def arg(self, a):
        """An FX argument as Value / Python constant (recursing into lists and tuples)."""
        if isinstance(a, fx.Node):
            return self.names[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    def tensor_of(self, a) -> torch.Tensor:
        """The concrete tensor an argument held when the example inputs ran."""
        return self.concrete[a]

    def shape_vector(self, node: fx.Node, dims) -> Value:
        """A 1-D int64 shape tensor from ints and scalar Values (from x.size(i))."""
        if all(isinstance(d, int) for d in dims):
            return self.const(node, np.array(dims, dtype=np.int64), "shape")
        parts = []
        for i, d in enumerate(dims):
            if isinstance(d, Value):
                parts.append(self.op(node, "Unsqueeze", [d, self.const(node, np.array([0], np.int64), f"axes{i}")], f"dim{i}"))
            else:
                parts.append(self.const(node, np.array([d], dtype=np.int64), f"dim{i}"))
        return self.op(node, "Concat", parts, "shape", axis=0)


def _target(gm, node):
    return type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target


def _module(e: _Emitter, node: fx.Node):
    return e.gm.get_submodule(node.target)


def _pair(v, n=2):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _conv_attrs(weight_shape, stride, padding, dilation, groups):
    k = list(weight_shape[2:])
    dilation = _pair(dilation, len(k))
    if padding == "valid":
        pads = [0] * (2 * len(k))
    elif padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _pair(padding, len(k))
        pads = p + p
    return dict(kernel_shape=k, strides=_pair(stride, len(k)), pads=pads, dilations=dilation, group=groups)


# ------------------------------------------------------------------ converters: (emitter, node) -> Value


def _quantize(e, node):
    x, scale, zp, qmin, qmax, axis, dtype = node.args
    storage = STORAGE[dtype]
    lo, hi = torch.iinfo(storage).min, torch.iinfo(storage).max
    if (qmin, qmax) != (lo, hi):
        raise FxQuantError(
            f"export_onnx: node '{node.name}' quantizes to [{qmin}, {qmax}], narrower than {dtype}; "
            f"QuantizeLinear saturates to [{lo}, {hi}] only. Use 8-bit activations (a_bits=8) for ONNX export."
        )
    zp_q = e.init(f"{zp.target}/{dtype}", e.tensor_of(zp).round().to(storage))
    return e.op(node, "QuantizeLinear", [e.arg(x), e.arg(scale), zp_q], axis=axis)


def _dequantize(e, node):
    q, scale, zp, axis = node.args
    storage = e.tensor_of(q).dtype
    zp_q = e.init(f"{zp.target}/{str(storage).split('.')[-1]}", e.tensor_of(zp).round().to(storage))
    return e.op(node, "DequantizeLinear", [e.arg(q), e.arg(scale), zp_q], axis=axis)


def _conv(e, node, x, w, b, stride=1, padding=0, dilation=1, groups=1):
    attrs = _conv_attrs(e.tensor_of(w).shape if isinstance(w, fx.Node) else w.shape, stride, padding, dilation, groups)
    return e.op(node, "Conv", [e.arg(x), _param(e, node, w, "weight"), _param(e, node, b, "bias")], **attrs)


def _linear(e, node, x, w, b=None):
    w_val, b_val = _param(e, node, w, "weight"), _param(e, node, b, "bias")
    if len(e.tensor_of(x).shape) == 2:
        return e.op(node, "Gemm", [e.arg(x), w_val, b_val], transB=1)
    wt = e.op(node, "Transpose", [w_val], "weight_t", perm=[1, 0])
    if b_val is None:
        return e.op(node, "MatMul", [e.arg(x), wt])
    return e.op(node, "Add", [e.op(node, "MatMul", [e.arg(x), wt], "matmul"), b_val])


def _param(e, node, p, what):
    """A weight/bias: an FX value, a float module parameter, or absent."""
    if p is None:
        return None
    if isinstance(p, fx.Node):
        return e.arg(p)
    return e.const(node, p, what)


def _conv_fn(e, node):
    return _conv(e, node, *node.args, **node.kwargs)


def _linear_fn(e, node):
    return _linear(e, node, *node.args, **node.kwargs)


def _conv_module(e, node):
    m = _module(e, node)
    if m.padding_mode != "zeros":
        raise FxQuantError(f"export_onnx: conv node '{node.name}' uses padding_mode={m.padding_mode!r}; only 'zeros' exports")
    return _conv(e, node, node.args[0], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _linear_module(e, node):
    m = _module(e, node)
    return _linear(e, node, node.args[0], m.weight, m.bias)


def _batchnorm(e, node):
    m = _module(e, node)
    params = [e.const(node, t, n) for n, t in (("scale", m.weight), ("bias", m.bias), ("mean", m.running_mean), ("var", m.running_var))]
    return e.op(node, "BatchNormalization", [e.arg(node.args[0]), *params], epsilon=m.eps)


def _unary(op_type, e, node):
    return e.op(node, op_type, [e.arg(node.args[0])])


def _clip(e, node, lo, hi):
    return e.op(node, "Clip", [e.arg(node.args[0]), e.const(node, np.float32(lo), "min"), e.const(node, np.float32(hi), "max")])


def _hardtanh_module(e, node):
    m = _module(e, node)
    return _clip(e, node, m.min_val, m.max_val)


def _binary(op_type, e, node):
    a, b = node.args[:2]
    if node.kwargs.get("alpha", 1) != 1:
        raise FxQuantError(f"export_onnx: node '{node.name}' uses alpha={node.kwargs['alpha']}; only alpha=1 exports")
    ins = [e.arg(x) if isinstance(x, fx.Node) else e.const(node, np.float32(x), f"const{i}") for i, x in enumerate((a, b))]
    return e.op(node, op_type, ins)


def _maxpool(e, node, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if return_indices:
        raise FxQuantError(f"export_onnx: node '{node.name}' asks for return_indices; not exported")
    k = _pair(kernel_size)
    p = _pair(padding)
    return e.op(node, "MaxPool", [e.arg(node.args[0])], kernel_shape=k, strides=_pair(stride) if stride else k,
                pads=p + p, dilations=_pair(dilation), ceil_mode=int(ceil_mode))


def _maxpool_module(e, node):
    m = _module(e, node)
    return _maxpool(e, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _maxpool_fn(e, node):
    return _maxpool(e, node, *node.args[1:], **node.kwargs)


def _avgpool_module(e, node):
    m = _module(e, node)
    k, p = _pair(m.kernel_size), _pair(m.padding)
    if m.divisor_override:
        raise FxQuantError(f"export_onnx: node '{node.name}' uses divisor_override; not exported")
    return e.op(node, "AveragePool", [e.arg(node.args[0])], kernel_shape=k, strides=_pair(m.stride) if m.stride else k,
                pads=p + p, ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))


def _adaptive_avgpool(e, node):
    out = _module(e, node).output_size if node.op == "call_module" else node.args[1]
    h, w = e.tensor_of(node.args[0]).shape[-2:]
    out = [o if o is not None else s for o, s in zip(_pair(out), (h, w))]
    if out == [1, 1]:
        return e.op(node, "GlobalAveragePool", [e.arg(node.args[0])])
    if h % out[0] or w % out[1]:
        raise FxQuantError(f"export_onnx: node '{node.name}': adaptive pool {h}x{w} -> {out} has uneven windows; not exported")
    k = [h // out[0], w // out[1]]
    return e.op(node, "AveragePool", [e.arg(node.args[0])], kernel_shape=k, strides=k)


def _flatten(e, node, start_dim=1, end_dim=-1):
    rank = len(e.tensor_of(node.args[0]).shape)
    start, end = start_dim % rank, end_dim % rank
    if start == 1 and end == rank - 1:
        return e.op(node, "Flatten", [e.arg(node.args[0])], axis=1)
    dims = [0] * start + [-1] + list(e.tensor_of(node.args[0]).shape[end + 1:])
    return e.op(node, "Reshape", [e.arg(node.args[0]), e.shape_vector(node, dims)])


def _flatten_fn(e, node):
    return _flatten(e, node, *node.args[1:], **node.kwargs)


def _flatten_module(e, node):
    m = _module(e, node)
    return _flatten(e, node, m.start_dim, m.end_dim)


def _reshape(e, node):
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return e.op(node, "Reshape", [e.arg(node.args[0]), e.shape_vector(node, list(e.arg(d) for d in dims))])


def _size(e, node):
    shape = e.op(node, "Shape", [e.arg(node.args[0])], "shape" if len(node.args) > 1 else "")
    if len(node.args) == 1:
        return shape
    return e.op(node, "Gather", [shape, e.const(node, np.array(node.args[1], dtype=np.int64), "index")], axis=0)


def _identity(e, node):
    return e.arg(node.args[0])


def _cat(e, node):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return e.op(node, "Concat", [e.arg(t) for t in tensors], axis=dim)


def _softmax(e, node):
    if node.op == "call_module":
        dim = _module(e, node).dim
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return e.op(node, "Softmax", [e.arg(node.args[0])], axis=dim)


def _getitem(e, node):
    seq, index = node.args
    value = e.arg(seq)
    if isinstance(value, (list, tuple)):
        return value[index]
    raise FxQuantError(f"export_onnx: node '{node.name}' indexes a tensor ({node.format_node()}); not exported yet")


CONVERTERS = {
    quantize: _quantize,
    dequantize: _dequantize,
    F.conv2d: _conv_fn,
    F.linear: _linear_fn,
    nn.Conv2d: _conv_module,
    nn.Linear: _linear_module,
    nn.BatchNorm2d: _batchnorm,
    nn.BatchNorm1d: _batchnorm,
    **{k: partial(_unary, "Relu") for k in (nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_")},
    F.relu6: lambda e, n: _clip(e, n, 0.0, 6.0),
    nn.ReLU6: _hardtanh_module,
    nn.Hardtanh: _hardtanh_module,
    **{k: partial(_unary, "Sigmoid") for k in (nn.Sigmoid, torch.sigmoid, "sigmoid")},
    **{k: partial(_binary, "Add") for k in (operator.add, torch.add, "add")},
    **{k: partial(_binary, "Sub") for k in (operator.sub, torch.sub, "sub")},
    **{k: partial(_binary, "Mul") for k in (operator.mul, torch.mul, "mul")},
    **{k: partial(_binary, "Div") for k in (operator.truediv, torch.div, "div")},
    nn.MaxPool2d: _maxpool_module,
    F.max_pool2d: _maxpool_fn,
    nn.AvgPool2d: _avgpool_module,
    nn.AdaptiveAvgPool2d: _adaptive_avgpool,
    F.adaptive_avg_pool2d: _adaptive_avgpool,
    torch.flatten: _flatten_fn,
    "flatten": _flatten_fn,
    nn.Flatten: _flatten_module,
    "view": _reshape,
    "reshape": _reshape,
    torch.reshape: _reshape,
    "size": _size,
    **{k: _identity for k in (nn.Dropout, nn.Identity, F.dropout, "contiguous", "detach")},
    torch.cat: _cat,
    **{k: _softmax for k in (nn.Softmax, F.softmax, torch.softmax)},
    operator.getitem: _getitem,
}


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        self.values[n] = result = super().run_node(n)
        return result


def _value_info(name: str, t: torch.Tensor, dynamic_batch: bool):
    shape = list(t.shape)
    if dynamic_batch and shape:
        shape[0] = "batch"
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], shape)


def to_onnx(gm: fx.GraphModule, example_inputs: tuple, *, opset: int = 17, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Build the ONNX model of an int8 (or float) GraphModule; no file is written."""
    with torch.no_grad():
        rec = _Recorder(gm)
        rec.run(*example_inputs)
    e = _Emitter(gm, rec.values)
    inputs, outputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            e.names[node] = Value(node.name)
            inputs.append(_value_info(node.name, rec.values[node], dynamic_batch))
        elif node.op == "get_attr":
            value = rec.values[node]
            e.names[node] = e.init(node.target, value) if isinstance(value, torch.Tensor) else value
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for i, r in enumerate(results):
                name = "output" if len(results) == 1 else f"output_{i}"
                e.nodes.append(helper.make_node("Identity", [e.arg(r)], [name], name=name))
                outputs.append(_value_info(name, rec.values[r], dynamic_batch))
        else:
            value = rec.values[node]
            convert = CONVERTERS.get(_target(gm, node))
            if convert is None and not isinstance(value, torch.Tensor) and node.op != "call_module" and node.target != "size":
                e.names[node] = value  # a Python value (a shape, an int): a constant in the file
                continue
            if convert is None:
                what = getattr(_target(gm, node), "__name__", str(node.target))
                raise FxQuantError(f"export_onnx: node '{node.name}' ({node.op} {what}) has no ONNX converter yet")
            e.names[node] = convert(e, node)
    used = {i for n in e.nodes for i in n.input}
    initializers = [t for name, t in e.initializers.items() if name in used]
    graph = helper.make_graph(e.nodes, type(gm).__name__, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fxquant")
    model.ir_version = min(model.ir_version, 10)
    return model


def _as_graph(model, example_inputs) -> fx.GraphModule:
    """The int8 graph to export: convert a fake-quant model, trace a float one."""
    from fxquant.api import convert, fake_quants
    from fxquant.passes import trace_model

    if isinstance(model, fx.GraphModule) and fake_quants(model):
        return convert(model)
    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, nn.Module):
        return trace_model(model.eval(), example_inputs=example_inputs)
    raise FxQuantError(f"model: expected an nn.Module or an fxquant GraphModule, got {type(model).__name__}")


def weight_dequantize_count(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes that read an initializer directly (the int8 weights and int32 biases)."""
    inits = {i.name for i in model.graph.initializer}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in model.graph.node)


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim, keeping every weight DequantizeLinear (its constant folding would turn them back to float)."""
    import onnxsim

    before = weight_dequantize_count(model)
    simplified, ok = onnxsim.simplify(model, skip_constant_folding=True)
    if not ok or weight_dequantize_count(simplified) != before:
        raise FxQuantError(f"export_onnx: onnxsim changed the weight DequantizeLinear nodes ({before} before); not simplified")
    return simplified


def export_onnx(model, path, example_inputs, *, opset: int = 17, dynamic_batch: bool = True, simplify: bool = False,
                check: bool = True) -> onnx.ModelProto:
    """Write `model` (fake-quant, reference int8, or float) to `path` as ONNX QDQ; returns the ModelProto."""
    from fxquant.api import _as_inputs

    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise FxQuantError(f"opset={opset!r}: expected an integer from {MIN_OPSET} (per-channel DequantizeLinear) to {MAX_OPSET}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FxQuantError(f"path={path!r}: folder {folder!r} does not exist")
    inputs = _as_inputs(example_inputs)
    onnx_model = to_onnx(_as_graph(model, inputs), inputs, opset=opset, dynamic_batch=dynamic_batch)
    if check:
        onnx.checker.check_model(onnx_model, full_check=True)
    if simplify:
        onnx_model = _simplify(onnx_model)
    fd, tmp = tempfile.mkstemp(prefix=".fxquant-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(onnx_model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return onnx_model
