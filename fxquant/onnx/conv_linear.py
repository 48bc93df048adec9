"""Conv, Gemm / MatMul and the normalisations: the ops that carry weights.

    F.conv1d/2d/3d / nn.Conv1d/2d/3d -> Conv (kernel, strides, pads, dilations, group; N-D)
    F.linear / nn.Linear       -> Gemm(transB=1) on 2-D inputs, else MatMul(x, Transpose(w)) (+ Add(bias))
    nn.BatchNorm1d/2d          -> BatchNormalization (a float model; quantize() folds BN into the conv)
    F.layer_norm / LayerNorm   -> LayerNormalization (opset 17)
    F.embedding                -> Gather(table, ids, axis=0): an int8 table is DequantizeLinear -> Gather
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from onnx import TensorProto
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.numerics import dequantize
from fxquant.onnx.emitter import Value, pair
from fxquant.onnx.shape import emit_pad


def _conv_attrs(weight_shape, stride, padding, dilation, groups):
    k = list(weight_shape[2:])
    dilation = pair(dilation, len(k))
    if padding == "valid":
        pads = [0] * (2 * len(k))
    elif padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = pair(padding, len(k))
        pads = p + p
    return dict(kernel_shape=k, strides=pair(stride, len(k)), pads=pads, dilations=dilation, group=groups)


def _conv(e, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    stride, padding, dilation, groups = (e.arg(a) for a in (stride, padding, dilation, groups))  # x.shape[1]: an int
    attrs = _conv_attrs(e.tensor_of(w).shape if isinstance(w, fx.Node) else w.shape, stride, padding, dilation, groups)
    return e.op(node, "Conv", [e.arg(x), e.param(node, w, "weight"), e.param(node, b, "bias")], **attrs)


def _stored(e, node: fx.Node):
    """The tensor a get_attr node reads."""
    return getattr(e.gm, node.target)


def _float_bias(e, node, b) -> Value | None:
    """An int32 bias (dequantize of a stored b_i32) as the float constant it dequantizes to (the oracle's float32
    product, what the DequantizeLinear would compute), for a linear that exports as MatMul + Add: a DequantizeLinear
    of an initializer would run at every call. (ORT 1.32's QDQ rules make DQ -> MatMul a MatMulIntegerToFloat and
    leave this Add beside it, a float Add per call: tools/bench_hf --profile.)"""
    if not (isinstance(b, fx.Node) and b.target is dequantize and all(isinstance(a, fx.Node) and a.op == "get_attr"
                                                                     for a in b.args[:3])):
        return None
    return e.init(f"{b.name}/float", dequantize(*(_stored(e, a) for a in b.args[:3]), b.args[3]))


def _linear(e, node, x, w, b=None):
    if len(e.tensor_of(x).shape) != 2 and (b_val := _float_bias(e, node, b)) is not None:
        w_val = e.param(node, w, "weight")
    else:
        w_val, b_val = e.param(node, w, "weight"), e.param(node, b, "bias")
    if len(e.tensor_of(x).shape) == 2:
        return e.op(node, "Gemm", [e.arg(x), w_val, b_val], transB=1)
    wt = e.op(node, "Transpose", [w_val], "weight_t", perm=[1, 0])
    if b_val is None:
        return e.op(node, "MatMul", [e.arg(x), wt])
    return e.op(node, "Add", [e.op(node, "MatMul", [e.arg(x), wt], "matmul"), b_val])


def _conv_fn(e, node):
    return _conv(e, node, *node.args, **node.kwargs)


def _linear_fn(e, node):
    return _linear(e, node, *node.args, **node.kwargs)


def _conv_module(e, node):
    """A conv with padding_mode reflect / replicate / circular pads its input itself, as nn.Conv does: a Pad (or
    Gathers), then the Conv without padding."""
    m, x, padding = e.module(node), node.args[0], e.module(node).padding
    if m.padding_mode != "zeros":
        x, padding = emit_pad(e, node, x, list(m._reversed_padding_repeated_twice), m.padding_mode, suffix="pad"), 0
    return _conv(e, node, x, m.weight, m.bias, m.stride, padding, m.dilation, m.groups)


def _linear_module(e, node):
    m = e.module(node)
    return _linear(e, node, node.args[0], m.weight, m.bias)


def _batchnorm(e, node):
    m = e.module(node)
    params = [e.const(node, t, n) for n, t in (("scale", m.weight), ("bias", m.bias), ("mean", m.running_mean), ("var", m.running_var))]
    return e.op(node, "BatchNormalization", [e.arg(node.args[0]), *params], epsilon=m.eps)


def _layer_norm(e, node, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if e.opset < 17:
        raise FxQuantError(f"export_onnx: node '{node.name}' is a layer norm: LayerNormalization needs opset >= 17")
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    scale = e.param(node, weight, "weight") if weight is not None else e.const(node, np.ones(shape, np.float32), "weight")
    return e.op(node, "LayerNormalization", [e.arg(x), scale, e.param(node, bias, "bias")], axis=-len(shape), epsilon=float(eps))


def _layer_norm_fn(e, node):
    return _layer_norm(e, node, *node.args, **node.kwargs)


def _layer_norm_module(e, node):
    m = e.module(node)
    return _layer_norm(e, node, node.args[0], m.normalized_shape, m.weight, m.bias, m.eps)


def _embedding_fn(e, node):
    """F.embedding(ids, table): Gather(table, ids) along the rows. An int8 table with one scale per row (zero point 0)
    is gathered first and only the rows read are dequantized, Cast(Gather(table_i8, ids)) * Gather(scale, ids): a
    DequantizeLinear of the whole table would run at every call (11.7M values for BERT's vocabulary), as ORT keeps
    DQ of an initializer unfolded. The table's own DequantizeLinear is then unused, and the walk drops it."""
    ids, table = node.args[:2]
    if isinstance(table, fx.Node) and table.target is dequantize and table.args[3] == 0 and table.args[0].op == "get_attr" \
            and not e.tensor_of(table.args[2]).any():
        q, scale = table.args[:2]
        rows = e.op(node, "Cast", [e.op(node, "Gather", [e.arg(q), e.arg(ids)], "rows_i8", axis=0)], "rows", to=TensorProto.FLOAT)
        row_scale = e.op(node, "Gather", [e.arg(scale), e.arg(ids)], "row_scale", axis=0)
        row_scale = e.op(node, "Unsqueeze", [row_scale, e.const(node, np.array([-1], dtype=np.int64), "last")], "row_scale_1")
        return e.op(node, "Mul", [rows, row_scale], "dequantized")  # not named as the node: no quantized Mul row
    return e.op(node, "Gather", [e.arg(table), e.arg(ids)], axis=0)


CONVERTERS = {
    F.conv1d: _conv_fn,
    F.embedding: _embedding_fn,
    F.conv2d: _conv_fn,
    F.conv3d: _conv_fn,
    F.linear: _linear_fn,
    nn.Conv1d: _conv_module,
    nn.Conv2d: _conv_module,
    nn.Conv3d: _conv_module,
    nn.Linear: _linear_module,
    nn.BatchNorm2d: _batchnorm,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm3d: _batchnorm,
    F.layer_norm: _layer_norm_fn,
    nn.LayerNorm: _layer_norm_module,
}
