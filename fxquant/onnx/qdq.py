"""QuantizeLinear / DequantizeLinear: the integer types, zero points and bias scales of the QDQ format.

    quantize(x, s, zp, qmin, qmax, axis, dtype)  -> QuantizeLinear, typed by [qmin, qmax] (8 bits; 4 from opset 21)
    dequantize(w_i8, s, zp)                      -> DequantizeLinear(axis=0), zp left out (ONNX's 0) where no fusion needs it
    dequantize(b_i32, s_b)                       -> DequantizeLinear(b_i32, Mul(s_x, s_w)): the bias scale computed, not stored
A per-tensor zero point is one initializer per value, shared: zero_point_uint8_128.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.meta import KEY
from fxquant.numerics import dequantize, quantize
from fxquant.onnx.emitter import Value


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


CONVERTERS = {
    quantize: _quantize,
    dequantize: _dequantize,
}
