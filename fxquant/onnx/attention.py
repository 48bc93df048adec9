"""Attention: matmuls, softmax, einsum and scaled_dot_product_attention.

    matmul / bmm / @                   -> MatMul
    softmax(dim)                       -> Softmax(axis)
    einsum (letters renamed a, b, ...) -> Einsum (quantize() turns an einsum that is a batched matmul into one)
    scaled_dot_product_attention       -> MatMul(Softmax(MatMul(q, k^T) * scale (+ mask)), v); a boolean mask by
                                          Where(mask, scores, -inf), is_causal by an upper-triangular -inf constant
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.onnx.emitter import call_arg


def _matmul(e, node):
    return e.op(node, "MatMul", [e.arg(node.args[0]), e.arg(node.args[1])])


def _softmax(e, node):
    if node.op == "call_module":
        dim = e.module(node).dim
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:  # F.softmax(x) without dim: torch's implicit choice (its _get_softmax_dim)
        dim = 0 if e.rank(node.args[0]) in (0, 1, 3) else 1
    return e.op(node, "Softmax", [e.arg(node.args[0])], axis=dim)


def _einsum(e, node):
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    letters = {c: chr(ord("a") + i) for i, c in enumerate(sorted({c for c in equation if c.isalpha()}))}
    if len(letters) > 26:
        raise FxQuantError(f"export_onnx: node '{node.name}': einsum with {len(letters)} subscripts; ONNX Einsum takes 26")
    equation = "".join(letters.get(c, c) for c in equation if not c.isspace())  # ONNX: lower-case letters, no spaces
    return e.op(node, "Einsum", [e.arg(t) for t in operands], equation=equation)


def _sdpa(e, node):
    """softmax(q k^T * scale + mask) v, the mask boolean (True: attend), additive, or causal (is_causal)."""
    q, k, v = node.args[:3]
    mask, dropout, causal = call_arg(node, 3, "attn_mask"), call_arg(node, 4, "dropout_p", 0.0), call_arg(node, 5, "is_causal", False)
    scale, gqa = call_arg(node, 6, "scale"), call_arg(node, 7, "enable_gqa", False)
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


CONVERTERS = {
    **{k: _matmul for k in (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")},
    **{k: _softmax for k in (nn.Softmax, F.softmax, torch.softmax, "softmax")},
    torch.einsum: _einsum,
    F.scaled_dot_product_attention: _sdpa,
}
