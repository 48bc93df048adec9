"""Pooling, reductions and resizing.

    max_pool2d / MaxPool2d           -> MaxPool              avg_pool2d / AvgPool2d -> AveragePool
    adaptive_avg_pool2d to 1x1       -> GlobalAveragePool    to an even grid        -> AveragePool(k = size / out)
    adaptive_avg_pool2d, uneven      -> MatMul(P_h, x) then MatMul(., P_w^T), P the averaging matrices
    mean(dim, keepdim)               -> ReduceMean (axes an input from opset 18)
    interpolate / Upsample           -> Resize (scales when they give the sizes exactly, else sizes)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.onnx.emitter import call_arg, pair


def _maxpool(e, node, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if return_indices:
        raise FxQuantError(f"export_onnx: node '{node.name}' asks for return_indices; not exported")
    k = pair(kernel_size)
    p = pair(padding)
    return e.op(node, "MaxPool", [e.arg(node.args[0])], kernel_shape=k, strides=pair(stride) if stride else k,
                pads=p + p, dilations=pair(dilation), ceil_mode=int(ceil_mode))


def _maxpool_module(e, node):
    m = e.module(node)
    return _maxpool(e, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _maxpool_fn(e, node):
    return _maxpool(e, node, *node.args[1:], **node.kwargs)


def _avgpool_module(e, node):
    m = e.module(node)
    k, p = pair(m.kernel_size), pair(m.padding)
    if m.divisor_override:
        raise FxQuantError(f"export_onnx: node '{node.name}' uses divisor_override; not exported")
    return e.op(node, "AveragePool", [e.arg(node.args[0])], kernel_shape=k, strides=pair(m.stride) if m.stride else k,
                pads=p + p, ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))


def _avgpool_fn(e, node):
    x, k = node.args[0], pair(call_arg(node, 1, "kernel_size"))
    stride, padding = call_arg(node, 2, "stride") or k, pair(call_arg(node, 3, "padding", 0))
    if call_arg(node, 6, "divisor_override") is not None:
        raise FxQuantError(f"export_onnx: node '{node.name}' uses divisor_override; not exported")
    return e.op(node, "AveragePool", [e.arg(x)], kernel_shape=k, strides=pair(stride), pads=padding + padding,
                ceil_mode=int(call_arg(node, 4, "ceil_mode", False)), count_include_pad=int(call_arg(node, 5, "count_include_pad", True)))


def _pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) matrix of adaptive average pooling: row i averages [floor(i size / out), ceil((i + 1) size / out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _adaptive_avgpool(e, node):
    out = e.module(node).output_size if node.op == "call_module" else node.args[1]
    h, w = e.tensor_of(node.args[0]).shape[-2:]
    out = [o if o is not None else s for o, s in zip(pair(out), (h, w))]
    if out == [1, 1]:
        return e.op(node, "GlobalAveragePool", [e.arg(node.args[0])])
    if h % out[0] or w % out[1]:  # uneven (or overlapping) windows: y = P_h @ x @ P_w^T, P the averaging matrices
        rows = e.op(node, "MatMul", [e.const(node, _pool_matrix(h, out[0]), "pool_h"), e.arg(node.args[0])], "pool_rows")
        return e.op(node, "MatMul", [rows, e.const(node, _pool_matrix(w, out[1]).T.copy(), "pool_w")])
    k = [h // out[0], w // out[1]]
    return e.op(node, "AveragePool", [e.arg(node.args[0])], kernel_shape=k, strides=k)


def _reduce_axes(e, node, op_type: str, x, axes, keepdims: bool):
    inputs = [e.arg(x)]
    if axes is None:
        return e.op(node, op_type, inputs, keepdims=int(keepdims))
    axes = [axes] if isinstance(axes, int) else list(axes)
    if e.opset >= 18:
        return e.op(node, op_type, inputs + [e.int64(node, axes, "axes")], keepdims=int(keepdims))
    return e.op(node, op_type, inputs, axes=axes, keepdims=int(keepdims))


def _mean(e, node):
    if call_arg(node, 3, "dtype") is not None:
        raise FxQuantError(f"export_onnx: node '{node.name}': mean(dtype=...) is not exported")
    return _reduce_axes(e, node, "ReduceMean", node.args[0], call_arg(node, 1, "dim"), call_arg(node, 2, "keepdim", False))


def _interpolate(e, node):
    if node.op == "call_module":
        m = e.module(node)
        mode, align = m.mode, m.align_corners
    else:
        mode, align = call_arg(node, 3, "mode", "nearest"), call_arg(node, 4, "align_corners")
    x = node.args[0]
    modes = {"nearest": ("nearest", "asymmetric"), "bilinear": ("linear", "half_pixel"), "bicubic": ("cubic", "half_pixel")}
    if mode not in modes or call_arg(node, 6, "antialias", False):
        raise FxQuantError(f"export_onnx: node '{node.name}' interpolates with mode={mode!r}; exported: {sorted(modes)}")
    onnx_mode, coords = modes[mode]
    attrs = dict(mode=onnx_mode, coordinate_transformation_mode="align_corners" if align else coords,
                 nearest_mode="floor" if mode == "nearest" else None, cubic_coeff_a=-0.75 if mode == "bicubic" else None)
    shape_in, shape_out = e.tensor_of(x).shape[2:], e.tensor_of(node).shape[2:]
    scales = [o / i for i, o in zip(shape_in, shape_out)]
    if all(int(np.float32(s) * i) == o for s, i, o in zip(scales, shape_in, shape_out)):  # the scales give the sizes exactly
        return e.op(node, "Resize", [e.arg(x), "", e.const(node, np.array([1, 1, *scales], np.float32), "scales")], **attrs)
    batch_channels = e.op(node, "Slice", [e.op(node, "Shape", [e.arg(x)], "shape"), e.int64(node, [0], "zero"),
                                          e.int64(node, [2], "two")], "nc")
    sizes = e.op(node, "Concat", [batch_channels, e.int64(node, list(shape_out), "spatial")], "sizes", axis=0)
    return e.op(node, "Resize", [e.arg(x), "", "", sizes], **attrs)


CONVERTERS = {
    nn.MaxPool2d: _maxpool_module,
    F.max_pool2d: _maxpool_fn,
    nn.AvgPool2d: _avgpool_module,
    F.avg_pool2d: _avgpool_fn,
    nn.AdaptiveAvgPool2d: _adaptive_avgpool,
    F.adaptive_avg_pool2d: _adaptive_avgpool,
    **{k: _mean for k in (torch.mean, "mean")},
    **{k: _interpolate for k in (F.interpolate, nn.Upsample)},
}
