"""The converter table: every FX op key (a function, a module type, a method name) -> its converter.

Each family file holds a table and the short functions it names; this is the one place they are joined.
A reader finds the converter of an op by its family:

    qdq.py          quantize, dequantize (QuantizeLinear / DequantizeLinear)
    conv_linear.py  conv, linear, batch norm, layer norm
    elementwise.py  relu, sigmoid, add, mul, silu, gelu, hardswish, dropout ...
    pooling.py      max / average / adaptive pooling, mean, interpolate
    shape.py        flatten, reshape, permute, cat, split, pad, getitem, size ...
    attention.py    matmul, softmax, einsum, scaled_dot_product_attention

A converter is `(emitter, fx_node) -> Value | constant` (see fxquant.onnx.emitter). An op key in two
families is an error at import, not a silent override.
"""

from __future__ import annotations

from fxquant.onnx import attention, conv_linear, elementwise, pooling, qdq, shape



FAMILIES = (qdq, conv_linear, elementwise, pooling, shape, attention)


def _join(families) -> dict:
    table: dict = {}
    for family in families:
        for key, convert in family.CONVERTERS.items():
            if key in table:
                raise RuntimeError(f"fxquant.onnx: op {key!r} has converters in two families (the second: {family.__name__})")
            table[key] = convert
    return table


CONVERTERS = _join(FAMILIES)
