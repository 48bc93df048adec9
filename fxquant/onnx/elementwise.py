"""Elementwise ops and activations: one ONNX op each, or a short formula.

    relu / sigmoid / tanh        -> Relu / Sigmoid / Tanh          relu6, hardtanh   -> Clip(min, max)
    add / sub / mul / div        -> Add / Sub / Mul / Div (Python numbers as constants: float, or int64 sizes)
    a // b                       -> Div (int64 sizes), Floor(Div) on float tensors
    silu                         -> Mul(x, Sigmoid(x))             hardsigmoid       -> HardSigmoid(1/6, 1/2)
    hardswish                    -> HardSwish (opset 14), else Mul(x, HardSigmoid(x))
    gelu                         -> Gelu (opset 20), else its erf or tanh formula
    dropout, identity, stochastic_depth at inference, contiguous, detach -> the input itself
"""

from __future__ import annotations

import operator
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops.stochastic_depth import stochastic_depth

from fxquant.backends import inference_identity
from fxquant.errors import FxQuantError
from fxquant.onnx.emitter import call_arg


def _unary(op_type, e, node):
    return e.op(node, op_type, [e.arg(node.args[0])])


def _clip(e, node, lo, hi):
    return e.op(node, "Clip", [e.arg(node.args[0]), e.const(node, np.float32(lo), "min"), e.const(node, np.float32(hi), "max")])


def _hardtanh_module(e, node):
    m = e.module(node)
    return _clip(e, node, m.min_val, m.max_val)


def _binary(op_type, e, node):
    a, b = node.args[:2]
    if node.kwargs.get("alpha", 1) != 1:
        raise FxQuantError(f"export_onnx: node '{node.name}' uses alpha={node.kwargs['alpha']}; only alpha=1 exports")
    if op_type == "Add" and isinstance(e.tensor_of(node), tuple):  # x.size()[:-2] + (d,): shapes concatenate
        return e.op(node, "Concat", [e.whole_shape(node, a), e.whole_shape(node, b)], axis=0)
    if any(isinstance(v, (list, tuple)) for v in (a, b, e.tensor_of(node))):  # [x.shape[0]] + [1] * (x.ndim - 1)
        raise FxQuantError(f"export_onnx: node '{node.name}' ({node.format_node()}) joins or repeats Python lists that hold "
                           "sizes following the batch; not exported. Build the size with tensor ops (x.new_ones(...), "
                           "torch.cat), or export with dynamic_batch=False")
    value = e.tensor_of(node)
    kind = np.int64  # sizes that follow the batch; an integer tensor's constant takes its dtype (RoBERTa's position ids)
    if isinstance(value, torch.Tensor):
        kind = np.float32 if value.is_floating_point() else torch.empty(0, dtype=value.dtype).numpy().dtype.type
    ins = [e.arg(x) if isinstance(x, fx.Node) else e.const(node, kind(x), f"const{i}") for i, x in enumerate((a, b))]
    return e.op(node, op_type, ins)


def _floordiv(e, node):
    """a // b: Div of int64 scalars (sizes, truncation = floor for sizes >= 0); Floor(a / b) on float tensors."""
    out = _binary("Div", e, node)
    value = e.tensor_of(node)
    return e.op(node, "Floor", [out], "floor") if isinstance(value, torch.Tensor) and value.is_floating_point() else out


def _identity(e, node):
    return e.arg(node.args[0])


def _silu(e, node):
    """silu(x) = x * sigmoid(x); a float model only: quantize() decomposes SiLU (passes/decompose_ops)."""
    x = e.arg(node.args[0])
    return e.op(node, "Mul", [x, e.op(node, "Sigmoid", [x], "sigmoid")])


def _stochastic_depth(e, node):
    if not inference_identity(None, node):
        raise FxQuantError(
            f"export_onnx: node '{node.name}' is stochastic_depth traced with training=True (the model was in train mode "
            "when quantize traced it, as qat=True does), so the file would drop rows at random. Quantize the model in eval "
            "mode (PTQ); for QAT set each StochasticDepth's p to 0 (or replace it by nn.Identity()) before quantize"
        )
    return e.arg(node.args[0])  # identity at inference


def _gelu(e, node):
    approximate = e.module(node).approximate if node.op == "call_module" else call_arg(node, 1, "approximate", "none")
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


CONVERTERS = {
    **{k: partial(_unary, "Relu") for k in (nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_")},
    F.relu6: lambda e, n: _clip(e, n, 0.0, 6.0),
    nn.ReLU6: _hardtanh_module,
    nn.Hardtanh: _hardtanh_module,
    **{k: partial(_unary, "Sigmoid") for k in (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid")},
    **{k: partial(_unary, "Tanh") for k in (nn.Tanh, torch.tanh, "tanh")},
    **{k: partial(_binary, "Add") for k in (operator.add, torch.add, "add")},
    **{k: partial(_binary, "Sub") for k in (operator.sub, torch.sub, "sub")},
    **{k: partial(_binary, "Mul") for k in (operator.mul, torch.mul, "mul")},
    **{k: partial(_binary, "Div") for k in (operator.truediv, torch.div, "div")},
    operator.floordiv: _floordiv,
    **{k: _identity for k in (nn.Dropout, nn.Identity, F.dropout, "contiguous", "detach")},
    **{k: _silu for k in (nn.SiLU, F.silu, "silu")},
    stochastic_depth: _stochastic_depth,
    **{k: _gelu for k in (nn.GELU, F.gelu)},
    **{k: _hardsigmoid for k in (nn.Hardsigmoid, F.hardsigmoid)},
    **{k: _hardswish for k in (nn.Hardswish, F.hardswish)},
}
