"""export_onnx: write the reference int8 graph (or a float model) as ONNX, one FX node at a time.

The int8 graph maps one to one onto ONNX QDQ:
    get_attr w_i8 (int8)     -> an int8 initializer           (weights are never float in the file)
    dequantize(w_i8, s, zp)  -> DequantizeLinear(axis=0)      (zp left out, ONNX's default 0, for a conv's weight)
    dequantize(b_i32, s_b)   -> DequantizeLinear(b_i32, Mul(s_x, s_w))  (the bias scale computed, not stored)
    quantize(x, s, zp)       -> QuantizeLinear                 (zp one shared initializer per value: zero_point_uint8_128)
    F.conv2d / F.linear      -> Conv / Gemm (or MatMul), between DequantizeLinear and QuantizeLinear
Every ONNX node is named after the FX node it comes from, so layers line up by name across the
fake-quant model, the reference int8 model and the file. A call fx kept whole (a leaf module, a
torch.fx.wrap function) without a row is exported by torch.onnx and inlined (fxquant.onnx_leaf); a node
that reads no model input and no backend row claims goes in as its value; any other op without a row
in CONVERTERS raises an FxQuantError naming the node. Python values that follow the batch (x.shape[0])
become ONNX shape ops, the others constants. The file is written atomically: on any failure nothing is
left at `path` (with external data, nothing at `path` or `path.data`).
"""

from __future__ import annotations

import operator
import os
import shutil
import tempfile
from functools import partial

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torchvision.ops.stochastic_depth import stochastic_depth

from fxquant.errors import FxQuantError
from fxquant.meta import KEY
from fxquant.numerics import dequantize, quantize
from fxquant.passes.trace_model import ShapeRunner, _all_to_meta, _is_wrapped, _on_meta, one_thread

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
        while inputs and inputs[-1] == "":  # a trailing absent input (Conv without bias) is left out: ORT's fusions expect that
            inputs.pop()
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

    def shape_vector(self, node: fx.Node, dims, *, reshape: bool = False) -> Value:
        """A 1-D int64 shape tensor from ints and scalar Values (from x.size(i)); `reshape`: -1 may stand for one."""
        if all(isinstance(d, int) for d in dims):
            return self.const(node, np.array(dims, dtype=np.int64), "shape")
        if reshape and sum(isinstance(d, Value) for d in dims) == 1 and -1 not in dims:  # Reshape infers the one that follows the batch
            return self.const(node, np.array([-1 if isinstance(d, Value) else d for d in dims], dtype=np.int64), "shape")
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


# the integer types QuantizeLinear / DequantizeLinear can store: (lowest, highest) -> (name, first opset)
ONNX_INTEGERS = {(0, 255): ("uint8", 13), (-128, 127): ("int8", 13), (0, 15): ("uint4", 21), (-8, 7): ("int4", 21)}
NP_INTEGERS = {"uint8": np.uint8, "int8": np.int8, "int32": np.int32, "uint4": ml_dtypes.uint4, "int4": ml_dtypes.int4}


def _integer_type(e, node, qmin: int, qmax: int, dtype: str, *, saturating: bool) -> str:
    """The ONNX type for integers in [qmin, qmax].

    saturating (QuantizeLinear): the type whose range is exactly [qmin, qmax], since the op clamps to its
    output type; 8 and 4 bits exist (4 from opset 21). Otherwise (an initializer, already in range): the
    narrowest type that holds the range, e.g. int4 for a 2- to 4-bit weight, int8 for 5 to 8 bits.
    """
    if dtype == "int32":
        return "int32"
    fits = [(hi - lo, name, first) for (lo, hi), (name, first) in ONNX_INTEGERS.items()
            if ((lo, hi) == (qmin, qmax) if saturating else lo <= qmin and qmax <= hi)]
    if not fits:
        raise FxQuantError(
            f"export_onnx: node '{node.name}' quantizes to [{qmin}, {qmax}] ({(qmax - qmin).bit_length()} bits); QuantizeLinear "
            f"saturates to its type's range, and ONNX has 8-bit types and 4-bit ones (opset 21) only: use a_bits=8 or a_bits=4"
        )
    _, name, first = min(fits)
    if e.opset < first:
        raise FxQuantError(f"export_onnx: node '{node.name}' stores integers in [{qmin}, {qmax}], which need ONNX {name} "
                           f"(opset {first} and later); export with opset={first}, or use 8 bits")
    return name


def _integers(e, name: str, t: torch.Tensor, onnx_type: str):
    t = t.detach().cpu()
    return e.init(f"{name}/{onnx_type}", (t.round() if t.is_floating_point() else t).numpy().astype(NP_INTEGERS[onnx_type]))


def _zero_point(e, zp: fx.Node, onnx_type: str) -> Value:
    """A zero point initializer. A per-tensor one is named by its value (`zero_point_uint8_128`) and shared
    by every Q/DQ that uses that value: 8 bytes of name per reference instead of ~50, one tensor per value."""
    t = e.tensor_of(zp)
    if t.numel() != 1 or t.dim() != 0:
        return _integers(e, zp.target, t, onnx_type)
    value = int(t.round()) if t.is_floating_point() else int(t)
    return e.init(f"zero_point_{onnx_type}_{value}", np.array(value).astype(NP_INTEGERS[onnx_type]))


# ops whose ORT fusion reads an absent weight zero point as 0: DQ -> Conv -> Q becomes QLinearConv either way;
# DQ -> Gemm / MatMul without the weight's zero point stays float on ORT 1.32 (so those weights keep it)
ZERO_POINT_OPTIONAL = (F.conv2d,)


def _omit_zero_point(node: fx.Node, zp_value: torch.Tensor, onnx_type: str) -> bool:
    """A zero point of 0 that ONNX's default (0 of the input's type) can stand for, without costing a fusion:
    an int32 bias's, or a symmetric weight's whose readers are all convs (ZERO_POINT_OPTIONAL)."""
    if zp_value.any():
        return False
    return onnx_type == "int32" or bool(node.users) and all(u.target in ZERO_POINT_OPTIONAL for u in node.users)


def _quantize(e, node):
    x, scale, zp, qmin, qmax, axis, dtype = node.args
    onnx_type = _integer_type(e, node, qmin, qmax, dtype, saturating=True)
    return e.op(node, "QuantizeLinear", [e.arg(x), e.arg(scale), _zero_point(e, zp, onnx_type)], axis=axis)


def _dequantize(e, node):
    """DequantizeLinear: of a QuantizeLinear (its type), or of an integer initializer (a weight: the type of its spec)."""
    q, scale, zp, axis = node.args
    spec = node.meta[KEY].weight if KEY in node.meta else None
    if isinstance(q, fx.Node) and q.target is quantize:
        onnx_type = _integer_type(e, q, *q.args[3:5], q.args[6], saturating=True)
    elif spec is not None:
        onnx_type = _integer_type(e, node, spec.qmin, spec.qmax, spec.dtype, saturating=False)
    else:
        onnx_type = str(e.tensor_of(q).dtype).split(".")[-1]
    q_value = e.arg(q)
    if isinstance(q, fx.Node) and q.op == "get_attr" and onnx_type != str(e.tensor_of(q).dtype).split(".")[-1]:
        q_value = _integers(e, q.target, e.tensor_of(q), onnx_type)  # e.g. a 4-bit weight held as int8 in torch
    weight_or_bias = isinstance(q, fx.Node) and q.op == "get_attr"
    scale_value = _bias_scale(e, node, scale) if onnx_type == "int32" else e.arg(scale)
    if weight_or_bias and _omit_zero_point(node, e.tensor_of(zp), onnx_type):
        return e.op(node, "DequantizeLinear", [q_value, scale_value], axis=axis)  # 1 byte (4 for a bias) per channel saved
    return e.op(node, "DequantizeLinear", [q_value, scale_value, _zero_point(e, zp, onnx_type)], axis=axis)


def _bias_scale(e, node: fx.Node, scale: fx.Node) -> Value:
    """The scale of an int32 bias, s_b = s_x * s_w (passes/lower_to_int8). When the stored vector is that float32
    product bit for bit, the file computes it, Mul(s_x, s_w) of two scales it holds anyway, instead of storing a
    third per-channel vector (4 bytes a channel); ORT folds the Mul into a constant when the session loads."""
    (reader,) = node.users if len(node.users) == 1 else (None,)
    x, w = reader.args[:2] if reader is not None and reader.target in (F.conv2d, F.linear) else (None, None)
    if not all(isinstance(a, fx.Node) and a.target is dequantize for a in (x, w)):
        return e.arg(scale)
    s_x, s_w = x.args[1], w.args[1]
    if not torch.equal(e.tensor_of(s_x) * e.tensor_of(s_w), e.tensor_of(scale)):
        return e.arg(scale)
    return e.op(node, "Mul", [e.arg(s_x), e.arg(s_w)], "scale")


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
    kind = np.float32 if isinstance(e.tensor_of(node), torch.Tensor) else np.int64  # int64: sizes that follow the batch
    ins = [e.arg(x) if isinstance(x, fx.Node) else e.const(node, kind(x), f"const{i}") for i, x in enumerate((a, b))]
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


def _pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) matrix of adaptive average pooling: row i averages [floor(i size / out), ceil((i + 1) size / out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _adaptive_avgpool(e, node):
    out = _module(e, node).output_size if node.op == "call_module" else node.args[1]
    h, w = e.tensor_of(node.args[0]).shape[-2:]
    out = [o if o is not None else s for o, s in zip(_pair(out), (h, w))]
    if out == [1, 1]:
        return e.op(node, "GlobalAveragePool", [e.arg(node.args[0])])
    if h % out[0] or w % out[1]:  # uneven (or overlapping) windows: y = P_h @ x @ P_w^T, P the averaging matrices
        rows = e.op(node, "MatMul", [e.const(node, _pool_matrix(h, out[0]), "pool_h"), e.arg(node.args[0])], "pool_rows")
        return e.op(node, "MatMul", [rows, e.const(node, _pool_matrix(w, out[1]).T.copy(), "pool_w")])
    k = [h // out[0], w // out[1]]
    return e.op(node, "AveragePool", [e.arg(node.args[0])], kernel_shape=k, strides=k)


def _flatten(e, node, start_dim=1, end_dim=-1):
    rank = len(e.tensor_of(node.args[0]).shape)
    start, end = start_dim % rank, end_dim % rank
    if start == 1 and end == rank - 1:
        return e.op(node, "Flatten", [e.arg(node.args[0])], axis=1)
    dims = [0] * start + [-1] + list(e.tensor_of(node.args[0]).shape[end + 1:])
    return e.op(node, "Reshape", [e.arg(node.args[0]), e.shape_vector(node, dims, reshape=True)])


def _flatten_fn(e, node):
    return _flatten(e, node, *node.args[1:], **node.kwargs)


def _flatten_module(e, node):
    m = _module(e, node)
    return _flatten(e, node, m.start_dim, m.end_dim)


def _reshape(e, node):
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return e.op(node, "Reshape", [e.arg(node.args[0]), e.shape_vector(node, list(e.arg(d) for d in dims), reshape=True)])


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


def _silu(e, node):
    """silu(x) = x * sigmoid(x); a float model only: quantize() decomposes SiLU (passes/decompose_ops)."""
    x = e.arg(node.args[0])
    return e.op(node, "Mul", [x, e.op(node, "Sigmoid", [x], "sigmoid")])


def _stochastic_depth(e, node):
    from fxquant.backends import inference_identity

    if not inference_identity(None, node):
        raise FxQuantError(
            f"export_onnx: node '{node.name}' is stochastic_depth traced with training=True; call model.eval() before quantize/export"
        )
    return e.arg(node.args[0])  # identity at inference


def _permute(e, node):
    dims = node.args[1:] or (node.kwargs["dims"],)
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    rank = len(e.tensor_of(node.args[0]).shape)
    return e.op(node, "Transpose", [e.arg(node.args[0])], perm=[d % rank for d in dims])


def _transpose(e, node):
    dim0, dim1 = node.args[1:3] if len(node.args) == 3 else (node.kwargs["dim0"], node.kwargs["dim1"])
    rank = len(e.tensor_of(node.args[0]).shape)
    perm = list(range(rank))
    perm[dim0 % rank], perm[dim1 % rank] = perm[dim1 % rank], perm[dim0 % rank]
    return e.op(node, "Transpose", [e.arg(node.args[0])], perm=perm)


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
    if isinstance(e.tensor_of(seq), torch.Tensor):
        return _getitem_tensor(e, node, seq, index)
    if isinstance(index, int):  # an element of a shape that follows the batch (x.shape[0])
        return e.op(node, "Gather", [value, e.const(node, np.array(index, dtype=np.int64), "index")], axis=0)
    raise FxQuantError(f"export_onnx: node '{node.name}' indexes a shape with {index!r} ({node.format_node()}); not exported")


# ------------------------------------------------------------------ model-zoo converters (transformers, mobile nets)

INT64_MAX = np.iinfo(np.int64).max


def _int64(e, node, values, suffix: str) -> Value:
    return e.const(node, np.array(values, dtype=np.int64), suffix)


def _rank(e, a) -> int:
    return len(e.tensor_of(a).shape)


def _arg(node, i: int, name: str, default=None):
    """Positional argument `i` or keyword `name` of an FX call."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _outputs(e, node, op_type: str, inputs, n: int, **attrs) -> list[Value]:
    """Emit one ONNX node with `n` outputs, named `<node>/0` ... `<node>/<n-1>`."""
    outs = [Value(f"{node.name}/{i}") for i in range(n)]
    e.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs, name=node.name, **attrs))
    return outs


def _layer_norm(e, node, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if e.opset < 17:
        raise FxQuantError(f"export_onnx: node '{node.name}' is a layer norm: LayerNormalization needs opset >= 17")
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    scale = _param(e, node, weight, "weight") if weight is not None else e.const(node, np.ones(shape, np.float32), "weight")
    return e.op(node, "LayerNormalization", [e.arg(x), scale, _param(e, node, bias, "bias")], axis=-len(shape), epsilon=float(eps))


def _layer_norm_fn(e, node):
    return _layer_norm(e, node, *node.args, **node.kwargs)


def _layer_norm_module(e, node):
    m = _module(e, node)
    return _layer_norm(e, node, node.args[0], m.normalized_shape, m.weight, m.bias, m.eps)


def _gelu(e, node):
    approximate = _module(e, node).approximate if node.op == "call_module" else _arg(node, 1, "approximate", "none")
    x = e.arg(node.args[0])
    if e.opset >= 20:
        return e.op(node, "Gelu", [x], approximate=approximate)
    half = e.op(node, "Mul", [x, e.const(node, np.float32(0.5), "half")], "half_x")
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = e.op(node, "Mul", [e.op(node, "Mul", [x, x], "x2"), x], "x3")
        inner = e.op(node, "Add", [x, e.op(node, "Mul", [cube, e.const(node, np.float32(0.044715), "c")], "cx3")], "inner")
        core = e.op(node, "Tanh", [e.op(node, "Mul", [inner, e.const(node, np.float32(np.sqrt(2 / np.pi)), "k")], "scaled")], "tanh")
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        core = e.op(node, "Erf", [e.op(node, "Div", [x, e.const(node, np.float32(np.sqrt(2.0)), "sqrt2")], "scaled")], "erf")
    return e.op(node, "Mul", [half, e.op(node, "Add", [core, e.const(node, np.float32(1.0), "one")], "one_plus")])


def _hardsigmoid(e, node):
    return e.op(node, "HardSigmoid", [e.arg(node.args[0])], alpha=1.0 / 6, beta=0.5)  # clip(x / 6 + 1 / 2, 0, 1)


def _hardswish(e, node):
    x = e.arg(node.args[0])
    if e.opset >= 14:
        return e.op(node, "HardSwish", [x])
    return e.op(node, "Mul", [x, e.op(node, "HardSigmoid", [x], "gate", alpha=1.0 / 6, beta=0.5)])


def _matmul(e, node):
    return e.op(node, "MatMul", [e.arg(node.args[0]), e.arg(node.args[1])])


def _sdpa(e, node):
    """softmax(q k^T * scale + mask) v, the mask boolean (True: attend), additive, or causal (is_causal)."""
    q, k, v = node.args[:3]
    mask, dropout, causal = _arg(node, 3, "attn_mask"), _arg(node, 4, "dropout_p", 0.0), _arg(node, 5, "is_causal", False)
    scale, gqa = _arg(node, 6, "scale"), _arg(node, 7, "enable_gqa", False)
    if dropout or gqa:
        raise FxQuantError(f"export_onnx: node '{node.name}': scaled_dot_product_attention with dropout_p or enable_gqa; not exported")
    q_shape, k_shape = e.tensor_of(q).shape, e.tensor_of(k).shape
    scale = scale if scale is not None else 1.0 / float(np.sqrt(q_shape[-1]))
    perm = list(range(len(k_shape) - 2)) + [len(k_shape) - 1, len(k_shape) - 2]
    k_t = e.op(node, "Transpose", [e.arg(k)], "k_t", perm=perm)
    scores = e.op(node, "Mul", [e.op(node, "MatMul", [e.arg(q), k_t], "qk"), e.const(node, np.float32(scale), "scale")], "scores")
    if causal:  # query i sees keys j <= i (top-left aligned, as torch)
        mask_value = np.triu(np.full((q_shape[-2], k_shape[-2]), -np.inf, np.float32), 1)
        scores = e.op(node, "Add", [scores, e.const(node, mask_value, "causal")], "causal_scores")
    if isinstance(mask, fx.Node) and e.tensor_of(mask).dtype == torch.bool:
        scores = e.op(node, "Where", [e.arg(mask), scores, e.const(node, np.float32(-np.inf), "neg_inf")], "masked")
    elif mask is not None:
        scores = e.op(node, "Add", [scores, e.arg(mask)], "masked")
    return e.op(node, "MatMul", [e.op(node, "Softmax", [scores], "attn", axis=-1), e.arg(v)])


def _einsum(e, node):
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    letters = {c: chr(ord("a") + i) for i, c in enumerate(sorted({c for c in equation if c.isalpha()}))}
    if len(letters) > 26:
        raise FxQuantError(f"export_onnx: node '{node.name}': einsum with {len(letters)} subscripts; ONNX Einsum takes 26")
    equation = "".join(letters.get(c, c) for c in equation if not c.isspace())  # ONNX: lower-case letters, no spaces
    return e.op(node, "Einsum", [e.arg(t) for t in operands], equation=equation)


def _reduce_axes(e, node, op_type: str, x, axes, keepdims: bool):
    inputs = [e.arg(x)]
    if axes is None:
        return e.op(node, op_type, inputs, keepdims=int(keepdims))
    axes = [axes] if isinstance(axes, int) else list(axes)
    if e.opset >= 18:
        return e.op(node, op_type, inputs + [_int64(e, node, axes, "axes")], keepdims=int(keepdims))
    return e.op(node, op_type, inputs, axes=axes, keepdims=int(keepdims))


def _mean(e, node):
    if _arg(node, 3, "dtype") is not None:
        raise FxQuantError(f"export_onnx: node '{node.name}': mean(dtype=...) is not exported")
    return _reduce_axes(e, node, "ReduceMean", node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))


def _unflatten(e, node):
    x, dim, sizes = node.args[0], _arg(node, 1, "dim"), list(_arg(node, 2, "sizes"))
    shape = list(e.tensor_of(x).shape)
    dim %= len(shape)
    dims = [0] * dim + sizes + shape[dim + 1:]  # 0: ONNX Reshape copies that input dimension (batch stays dynamic)
    return e.op(node, "Reshape", [e.arg(x), e.shape_vector(node, dims, reshape=True)])


def _unsqueeze(e, node):
    dim = _arg(node, 1, "dim") % (_rank(e, node.args[0]) + 1)
    return e.op(node, "Unsqueeze", [e.arg(node.args[0]), _int64(e, node, [dim], "axes")])


def _squeeze(e, node):
    dim = _arg(node, 1, "dim")
    shape = e.tensor_of(node.args[0]).shape
    dims = [d for d in range(len(shape)) if shape[d] == 1] if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = [d % len(shape) for d in dims if shape[d] == 1]  # torch leaves a dimension that is not 1 alone
    if not dims:
        return e.arg(node.args[0])
    return e.op(node, "Squeeze", [e.arg(node.args[0]), _int64(e, node, dims, "axes")])


def _expand(e, node):
    sizes = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "size"),)
    sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)) else list(sizes)
    dims = [e.arg(d) for d in sizes]
    dims = [1 if isinstance(d, int) and d == -1 else d for d in dims]  # ONNX Expand broadcasts: 1 keeps the input dim
    return e.op(node, "Expand", [e.arg(node.args[0]), e.shape_vector(node, dims)])


def _split_sizes(length: int, chunks: int) -> list[int]:
    """torch.chunk: pieces of ceil(length / chunks), the last one shorter; possibly fewer pieces."""
    step = -(-length // chunks)
    return [min(step, length - start) for start in range(0, length, step)]


def _split_into(e, node, x, sizes, dim) -> list[Value]:
    dim %= _rank(e, x)
    return _outputs(e, node, "Split", [e.arg(x), _int64(e, node, sizes, "split")], len(sizes), axis=dim)


def _chunk(e, node):
    x, chunks, dim = node.args[0], _arg(node, 1, "chunks"), _arg(node, 2, "dim", 0)
    return _split_into(e, node, x, _split_sizes(e.tensor_of(x).shape[dim], chunks), dim)


def _split(e, node):
    x, size, dim = node.args[0], _arg(node, 1, "split_size_or_sections", _arg(node, 1, "split_size")), _arg(node, 2, "dim", 0)
    length = e.tensor_of(x).shape[dim]
    sizes = list(size) if isinstance(size, (list, tuple)) else [min(size, length - s) for s in range(0, length, size)]
    return _split_into(e, node, x, sizes, dim)


def _pad_amounts(pad, rank: int) -> list[int]:
    """torch's (last_begin, last_end, prev_begin, prev_end, ...) as ONNX's (begins..., ends...) over all dims."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return begins + ends


def _pad(e, node, x, pad, mode="constant", value=None):
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}
    if mode not in modes:
        raise FxQuantError(f"export_onnx: node '{node.name}' pads with mode={mode!r}; exported: {sorted(modes)}")
    inputs = [e.arg(x), _int64(e, node, _pad_amounts(list(pad), _rank(e, x)), "pads")]
    if mode == "constant":
        inputs.append(e.const(node, np.array(value or 0.0, dtype=np.float32), "value"))
    return e.op(node, "Pad", inputs, mode=modes[mode])


def _pad_fn(e, node):
    return _pad(e, node, *node.args, **node.kwargs)


def _pad_module(e, node):
    m = _module(e, node)
    return _pad(e, node, node.args[0], m.padding, "constant", getattr(m, "value", 0.0))


def _interpolate(e, node):
    if node.op == "call_module":
        m = _module(e, node)
        mode, align = m.mode, m.align_corners
    else:
        mode, align = _arg(node, 3, "mode", "nearest"), _arg(node, 4, "align_corners")
    x = node.args[0]
    modes = {"nearest": ("nearest", "asymmetric"), "bilinear": ("linear", "half_pixel"), "bicubic": ("cubic", "half_pixel")}
    if mode not in modes or _arg(node, 6, "antialias", False):
        raise FxQuantError(f"export_onnx: node '{node.name}' interpolates with mode={mode!r}; exported: {sorted(modes)}")
    onnx_mode, coords = modes[mode]
    attrs = dict(mode=onnx_mode, coordinate_transformation_mode="align_corners" if align else coords,
                 nearest_mode="floor" if mode == "nearest" else None, cubic_coeff_a=-0.75 if mode == "bicubic" else None)
    shape_in, shape_out = e.tensor_of(x).shape[2:], e.tensor_of(node).shape[2:]
    scales = [o / i for i, o in zip(shape_in, shape_out)]
    if all(int(np.float32(s) * i) == o for s, i, o in zip(scales, shape_in, shape_out)):  # the scales give the sizes exactly
        return e.op(node, "Resize", [e.arg(x), "", e.const(node, np.array([1, 1, *scales], np.float32), "scales")], **attrs)
    batch_channels = e.op(node, "Slice", [e.op(node, "Shape", [e.arg(x)], "shape"), _int64(e, node, [0], "zero"),
                                          _int64(e, node, [2], "two")], "nc")
    sizes = e.op(node, "Concat", [batch_channels, _int64(e, node, list(shape_out), "spatial")], "sizes", axis=0)
    return e.op(node, "Resize", [e.arg(x), "", "", sizes], **attrs)


def _avgpool_fn(e, node):
    x, k = node.args[0], _pair(_arg(node, 1, "kernel_size"))
    stride, padding = _arg(node, 2, "stride") or k, _pair(_arg(node, 3, "padding", 0))
    if _arg(node, 6, "divisor_override") is not None:
        raise FxQuantError(f"export_onnx: node '{node.name}' uses divisor_override; not exported")
    return e.op(node, "AveragePool", [e.arg(x)], kernel_shape=k, strides=_pair(stride), pads=padding + padding,
                ceil_mode=int(_arg(node, 4, "ceil_mode", False)), count_include_pad=int(_arg(node, 5, "count_include_pad", True)))


def _getattr(e, node):
    x, attr = node.args
    if attr != "shape":
        raise FxQuantError(f"export_onnx: node '{node.name}' reads .{attr} of a tensor per batch; only .shape is exported")
    return e.op(node, "Shape", [e.arg(x)])


def _floordiv(e, node):
    """a // b: Div of int64 scalars (sizes, truncation = floor for sizes >= 0); Floor(a / b) on float tensors."""
    out = _binary("Div", e, node)
    value = e.tensor_of(node)
    return e.op(node, "Floor", [out], "floor") if isinstance(value, torch.Tensor) and value.is_floating_point() else out


def _index(i, length: int):
    """A getitem entry as (start, end, step, squeeze) on a dimension of `length`."""
    if isinstance(i, int):
        return i, (i + 1) or INT64_MAX, 1, True
    if isinstance(i, slice) and all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
        step = i.step or 1
        return (i.start if i.start is not None else 0 if step > 0 else -1,
                i.stop if i.stop is not None else INT64_MAX if step > 0 else -INT64_MAX, step, False)
    return None


def _getitem_tensor(e, node, x, index):
    """x[...] with ints, slices, None and Ellipsis: one Slice, then Squeeze / Unsqueeze; x[tensor]: Gather."""
    if isinstance(index, fx.Node):
        return e.op(node, "Gather", [e.arg(x), e.arg(index)], axis=0)
    index = index if isinstance(index, tuple) else (index,)
    shape = e.tensor_of(x).shape
    given = sum(i is not None and i is not Ellipsis for i in index)
    full = []
    for i in index:
        full += [slice(None)] * (len(shape) - given) if i is Ellipsis else [i]
    full += [slice(None)] * (len(shape) - sum(i is not None for i in full))
    starts, ends, axes, steps, squeeze, unsqueeze, dim, out = [], [], [], [], [], [], 0, 0
    for i in full:
        if i is None:
            unsqueeze.append(out)
            out += 1
            continue
        parsed = _index(i, shape[dim])
        if parsed is None:
            raise FxQuantError(f"export_onnx: node '{node.name}' indexes with {i!r}; exported: ints, slices, None, ..., a tensor")
        if parsed[:3] != (0, INT64_MAX, 1):
            starts, ends, axes, steps = starts + [parsed[0]], ends + [parsed[1]], axes + [dim], steps + [parsed[2]]
        squeeze += [dim] if parsed[3] else []
        out += 0 if parsed[3] else 1
        dim += 1
    steps_ = [("Slice", [_int64(e, node, v, n) for v, n in ((starts, "starts"), (ends, "ends"), (axes, "axes"), (steps, "steps"))])] if starts else []
    steps_ += [("Squeeze", [_int64(e, node, squeeze, "squeeze_axes")])] if squeeze else []
    steps_ += [("Unsqueeze", [_int64(e, node, unsqueeze, "unsqueeze_axes")])] if unsqueeze else []
    y = e.arg(x)
    for k, (op_type, extra) in enumerate(steps_ or [("Identity", [])]):
        y = e.op(node, op_type, [y] + extra, "" if k == len(steps_) - 1 or not steps_ else op_type.lower())
    return y  # the last op carries the FX node's name


# ------------------------------------------------------------------ leaves: modules and wrapped functions fx kept whole


def _float_leaf(e, node):
    """A call fx did not trace into (a leaf module, a torch.fx.wrap function), exported by torch.onnx and inlined."""
    from fxquant.onnx_leaf import inline_leaf

    if node in e.needs_values:
        raise FxQuantError(
            f"export_onnx: node '{node.name}' ({node.format_node()}) reads tensor values (it cannot run on shapes alone), "
            "so an exported trace would freeze the branch the example took. Fix: write the branch with tensor ops "
            "(torch.where) so torch.fx traces it, or leave that module out of the model you export."
        )
    return inline_leaf(e, node)


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
    torch.concat: _cat,  # issue 4 rows: efficientnet (silu, stochastic depth), shared-qparam transpose
    **{k: _silu for k in (nn.SiLU, F.silu, "silu")},
    F.sigmoid: partial(_unary, "Sigmoid"),
    stochastic_depth: _stochastic_depth,
    **{k: _permute for k in (torch.permute, "permute")},
    **{k: _transpose for k in (torch.transpose, "transpose")},
    **{k: _softmax for k in (nn.Softmax, F.softmax, torch.softmax)},
    operator.getitem: _getitem,
    # model zoo (issue 5): transformers, mobile nets, shapes that follow the batch
    **{k: _layer_norm_fn for k in (F.layer_norm,)},
    nn.LayerNorm: _layer_norm_module,
    **{k: _gelu for k in (nn.GELU, F.gelu)},
    **{k: _hardsigmoid for k in (nn.Hardsigmoid, F.hardsigmoid)},
    **{k: _hardswish for k in (nn.Hardswish, F.hardswish)},
    **{k: partial(_unary, "Tanh") for k in (nn.Tanh, torch.tanh, "tanh")},
    **{k: _matmul for k in (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")},
    torch.einsum: _einsum,
    F.scaled_dot_product_attention: _sdpa,
    **{k: _mean for k in (torch.mean, "mean")},
    "softmax": _softmax,
    **{k: _transpose for k in (torch.swapaxes, "swapaxes")},
    "unflatten": _unflatten,
    **{k: _unsqueeze for k in (torch.unsqueeze, "unsqueeze")},
    **{k: _squeeze for k in (torch.squeeze, "squeeze")},
    "expand": _expand,
    **{k: _chunk for k in (torch.chunk, "chunk")},
    **{k: _split for k in (torch.split, "split")},
    F.pad: _pad_fn,
    **{k: _pad_module for k in (nn.ZeroPad2d, nn.ConstantPad2d)},
    **{k: _interpolate for k in (F.interpolate, nn.Upsample)},
    F.avg_pool2d: _avgpool_fn,
    getattr: _getattr,
    operator.floordiv: _floordiv,
}


class _Recorder(ShapeRunner):
    """A ShapeRunner that also tries each leaf call on the meta device first: a leaf that cannot run on
    shapes alone reads tensor values, and torch.onnx's trace of it would freeze the branch the example took."""

    def __init__(self, gm, leaves: set, *, real: bool = False):
        super().__init__(gm, real=real)
        self.leaves, self.needs_values = leaves, set()

    def run_node(self, n):
        if n in self.leaves:
            args, kwargs = _all_to_meta(self.fetch_args_kwargs_from_env(n))
            try:
                if n.op == "call_module":
                    with _on_meta(self.fetch_attr(n.target)) as module:
                        module(*args, **kwargs)
                else:
                    n.target(*args, **kwargs)
            except Exception:
                self.needs_values.add(n)
        return super().run_node(n)


def _batch_plus_one(t):
    """The input at one more batch row (the first row repeated), to see which values follow the batch."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return torch.cat([t, t[:1]]) if t.device.type != "meta" else t.new_empty((t.shape[0] + 1, *t.shape[1:]))


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value


@torch.no_grad()
def _record(gm: fx.GraphModule, example_inputs: tuple, dynamic_batch: bool, leaves: set):
    """(values at the example batch, nodes whose Python value changes with the batch, leaves that read values).

    A ShapeRunner walks the graph (small tensors for real, the rest on the meta device); when a node
    needs tensor values, the example inputs run for real. With `dynamic_batch` it walks it again at one
    more batch row, to see which Python values (sizes) follow the batch.
    """
    runs = [tuple(example_inputs)] + ([tuple(_batch_plus_one(t) for t in example_inputs)] if dynamic_batch else [])
    try:
        recorders = [_Recorder(gm, leaves) for _ in runs]
        with one_thread():  # its real calls are on small tensors
            for rec, inputs in zip(recorders, runs):
                rec.run(*inputs)
    except Exception:
        recorders = [_Recorder(gm, leaves, real=True) for _ in runs]
        for rec, inputs in zip(recorders, runs):
            try:
                rec.run(*inputs)
            except Exception as exc:
                again = " at one more batch row (export with dynamic_batch=False)" if rec is not recorders[0] else ""
                raise FxQuantError(f"export_onnx: the model fails on example_inputs{again}: {type(exc).__name__}: {exc}") from exc
    values, changed = recorders[0].values, set()
    if dynamic_batch:
        other = recorders[1].values
        changed = {n for n, v in values.items() if not isinstance(v, torch.Tensor) and _signature(v) != _signature(other.get(n))}
    return values, changed, set().union(*(r.needs_values for r in recorders))


def _depends_on_inputs(gm: fx.GraphModule) -> set:
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value)


def _is_leaf_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module call, or a function torch.fx.wrap kept whole (not a torch op, which must have a converter)."""
    return node.op == "call_module" or (node.op == "call_function" and _is_wrapped(node.target))


def _foldable(node: fx.Node, constant: bool) -> bool:
    """A node that reads no model input and no backend row claims: its value goes in the file as a constant.
    Quantize/dequantize stay nodes, so weights stay integer initializers."""
    claimed = KEY in node.meta and node.meta[KEY].rule is not None
    return constant and node.target not in (quantize, dequantize) and not claimed


def _value_info(name: str, t: torch.Tensor, dynamic_batch: bool):
    shape = list(t.shape)
    if dynamic_batch and shape:
        shape[0] = "batch"
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], shape)


def to_onnx(gm: fx.GraphModule, example_inputs: tuple, *, opset: int = 17, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Build the ONNX model of an int8 (or float) GraphModule; no file is written.

    Shapes come from running the example inputs on the meta device; with `dynamic_batch`, a second
    run at one more batch row tells which Python values follow the batch (x.shape[0]): those become
    ONNX ops, every other one a constant. A node that reads no model input and no backend row claims
    goes in the file as its value.
    """
    leaves = {n for n in gm.graph.nodes if _is_leaf_call(gm, n) and CONVERTERS.get(_target(gm, n)) is None}
    values, batch_values, needs_values = _record(gm, example_inputs, dynamic_batch, leaves)
    e = _Emitter(gm, values)
    e.opset = opset  # the integer types Q/DQ may use depend on it
    e.needs_values = needs_values  # a leaf that could not run on shapes alone
    e.batch_values = batch_values  # Python values (sizes) that follow the batch
    from_inputs = _depends_on_inputs(gm)
    e.batch_dependent = from_inputs if dynamic_batch else set()
    real: dict = {}  # constant nodes' real values, computed when folded
    inputs, outputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            e.names[node] = Value(node.name)
            inputs.append(_value_info(node.name, values[node], dynamic_batch))
        elif node.op == "get_attr":
            value = values[node]
            e.names[node] = e.init(node.target, value) if isinstance(value, torch.Tensor) else value
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for i, r in enumerate(results):
                name = "output" if len(results) == 1 else f"output_{i}"
                e.nodes.append(helper.make_node("Identity", [e.arg(r)], [name], name=name))
                outputs.append(_value_info(name, values[r], dynamic_batch))
        else:
            e.names[node] = _convert(e, node, batch_values, node not in from_inputs, real)
    used = {i for n in e.nodes for i in n.input}
    initializers = [t for name, t in e.initializers.items() if name in used]
    graph = helper.make_graph(e.nodes, type(gm).__name__, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fxquant")
    model.ir_version = min(model.ir_version, 10)
    return model


def _real_value(gm: fx.GraphModule, node: fx.Node, cache: dict):
    """The real value of a node that reads no model input (its inputs computed first, memoised in `cache`)."""
    if node not in cache:
        for a in node.all_input_nodes:
            _real_value(gm, a, cache)
        runner = fx.Interpreter(gm)
        runner.env = cache
        with torch.no_grad():
            cache[node] = runner.run_node(node)
    return cache[node]


def _convert(e: _Emitter, node: fx.Node, batch_values: set, constant: bool, real: dict):
    """The Value (or Python constant) of one FX call node, emitting its ONNX nodes."""
    value = e.tensor_of(node)
    if not _holds_tensor(value) and node not in batch_values:
        return value  # a Python value the same at every batch (a size, a flag): a constant in the file
    if isinstance(value, torch.Tensor) and _foldable(node, constant):
        return e.init(node.name, _real_value(e.gm, node, real))
    convert = CONVERTERS.get(_target(e.gm, node))
    if convert is None and _is_leaf_call(e.gm, node):
        convert = _float_leaf
    if convert is None:
        what = getattr(_target(e.gm, node), "__name__", str(node.target))
        raise FxQuantError(f"export_onnx: node '{node.name}' ({node.op} {what}) has no ONNX converter yet")
    return convert(e, node)


def _as_graph(model, example_inputs) -> fx.GraphModule:
    """The int8 graph to export: convert a fake-quant model, trace a float one."""
    from fxquant.api import convert, fake_quants
    from fxquant.passes import trace_model

    if isinstance(model, fx.GraphModule) and fake_quants(model):
        return convert(model)
    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, nn.Module):
        return trace_model(model.eval(), example_inputs=example_inputs, auto_leaf=True)
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


def _float_nodes(gm: fx.GraphModule) -> list[str]:
    """The traced ops no backend row claimed (the user's exclude=, or ops the table keeps float)."""
    from fxquant.meta import KEY

    return [n.name for n in gm.graph.nodes if n.op.startswith("call_") and n.target not in (quantize, dequantize)
            and KEY in n.meta and (n.meta[KEY].rule is None or n.meta[KEY].kind == "float")]


def export_onnx(model, path, example_inputs, *, opset: int = 17, dynamic_batch: bool = True, simplify: bool = False,
                check: bool = True, backend=None, external_data: bool | None = None) -> onnx.ModelProto:
    """Write `model` (fake-quant, reference int8, or float) to `path` as ONNX QDQ; returns the ModelProto.

    A quantized model's file records its backend (metadata_props) and, with `check=True`, is checked
    by onnx.checker and by fxquant.onnx_check against that backend's rule table: any violation raises
    and no file is written. `backend` (a name or Backend) overrides the one recorded at quantize time.
    `external_data`: keep the tensors in `<path>.data` beside the file (ONNX external data); None
    decides by size, on when the file would pass protobuf's 2 GB (a float vit_h_14 or regnet_y_128gf).
    The returned ModelProto then refers to that file instead of holding the tensors.
    """
    from fxquant.api import _as_inputs
    from fxquant.backends import BACKEND_META, load_backend
    from fxquant.onnx_check import assert_valid, stamp

    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise FxQuantError(f"opset={opset!r}: expected an integer from {MIN_OPSET} (per-channel DequantizeLinear) to {MAX_OPSET}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FxQuantError(f"path={path!r}: folder {folder!r} does not exist")
    inputs = _as_inputs(example_inputs)
    graph = _as_graph(model, inputs)
    table = backend if backend is not None else graph.meta.get(BACKEND_META)
    table = load_backend(table) if table is not None else None
    onnx_model = to_onnx(graph, inputs, opset=opset, dynamic_batch=dynamic_batch)
    external = _too_big(onnx_model) if external_data is None else bool(external_data)
    if check and not external:  # a model past 2 GB is checked from its files (below)
        onnx.checker.check_model(onnx_model, full_check=True)
    if simplify and external:
        raise FxQuantError("simplify=True: onnxsim takes models under 2 GB; export with simplify=False (or external_data=False)")
    if simplify:
        onnx_model = _simplify(onnx_model)
    if table is not None:
        stamp(onnx_model, table, _float_nodes(graph))
        if check:
            assert_valid(onnx_model)
    _save(onnx_model, path, external=external, check=check)
    return onnx_model


PROTOBUF_LIMIT = 2**31 - 1  # bytes: one serialized ModelProto cannot pass this


def _too_big(model: onnx.ModelProto) -> bool:
    tensors = sum(t.ByteSize() for t in model.graph.initializer)
    return tensors + 64 * 2**20 > PROTOBUF_LIMIT  # 64 MiB for the nodes and names


def _save(model: onnx.ModelProto, path: str, *, external: bool, check: bool) -> None:
    """Write atomically: into a temporary folder beside `path` (checked there when `external`), then moved
    into place; with external data, `<name>.data` first, then the model that points to it."""
    folder, name = os.path.split(os.path.abspath(path))
    tmpdir = tempfile.mkdtemp(prefix=".fxquant-", dir=folder)
    try:
        tmp = os.path.join(tmpdir, name)
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.data",
                            size_threshold=0)
            if check:
                onnx.checker.check_model(tmp, full_check=True)
            if os.path.exists(os.path.join(tmpdir, f"{name}.data")):  # absent when the model has no tensors
                os.replace(os.path.join(tmpdir, f"{name}.data"), os.path.join(folder, f"{name}.data"))
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
