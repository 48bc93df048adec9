"""decompose_ops: rewrite composite activations into the primitive ops the backend rows quantize.

before:  %act = call_module[target=act](%conv)                        # nn.SiLU (or F.silu, x.silu())
after:   %act_sigmoid = call_function[torch.sigmoid](%conv)
         %act = call_function[operator.mul](%conv, %act_sigmoid)      # silu(x) = x * sigmoid(x)

ONNX Runtime has no integer SiLU, but it has QLinearSigmoid and QLinearMul: decomposed, an
EfficientNet runs integer end to end instead of leaving every activation in float. The last node
keeps the original name (layers line up across stages); excluded modules and functions stay whole.

    %attn = call_function[torch.einsum]("bhid,bhjd->bhij", %q, %k)
 -> %attn_k_t = call_function[torch.transpose](%k, -2, -1);  %attn = call_function[torch.matmul](%q, %attn_k_t)

An einsum that is a batched matmul (maxvit's attention) becomes one, so the matmul row quantizes it
(QLinearMatMul); a decomposition returns None to decline (any other einsum stays float).
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.meta import info, matches_names, op_key


def _silu(graph: fx.Graph, node: fx.Node, x):
    """silu(x) = x * sigmoid(x)"""
    sigmoid = graph.create_node("call_function", torch.sigmoid, (x,), name=f"{node.name}_sigmoid")
    return sigmoid, operator.mul, (x, sigmoid)


def _transposed(graph: fx.Graph, node: fx.Node, x: fx.Node) -> fx.Node:
    t = graph.create_node("call_function", torch.transpose, (x, -2, -1), name=f"{node.name}_{x.name}_t")
    shape = info(x).shape
    info(t).shape, info(t).dtype = (*shape[:-2], shape[-1], shape[-2]) if shape else None, info(x).dtype
    return t


def _einsum(graph: fx.Graph, node: fx.Node, equation):
    """einsum("...ik,...kj->...ij", a, b) = a @ b, a batched matmul in disguise (maxvit's attention):
    each operand's last two subscripts hold its row (or column) letter and the one contracted letter k,
    the other subscripts are the same batch letters in all three terms. a (..., k, i) or b (..., j, k)
    is transposed first. Any other equation (a sum, an outer product, a trace) is declined: None."""
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # einsum(equation, [a, b])
        operands = operands[0]
    if not isinstance(equation, str) or "->" not in equation or len(operands) != 2 or node.kwargs:
        return None
    terms = equation.replace(" ", "").replace("...", "*").replace("->", ",").split(",")
    if len(terms) != 3 or len({len(t) for t in terms}) != 1 or len(terms[0]) < 2 or any(len(set(t)) != len(t) for t in terms):
        return None
    (a, b, out), batch = terms, terms[2][:-2]
    i, j = out[-2:]
    k = set(a[-2:]) & set(b[-2:])
    if a[:-2] != batch or b[:-2] != batch or len(k) != 1 or set(a[-2:]) != {i, *k} or set(b[-2:]) != {j, *k} or i == j:
        return None
    (k,) = k
    x, y = operands
    first = None
    if a[-2:] == k + i:
        x = first = _transposed(graph, node, x)
    if b[-2:] == j + k:
        y = first = _transposed(graph, node, y)
    return first, torch.matmul, (x, y)


DECOMPOSITIONS = {nn.SiLU: _silu, F.silu: _silu, "silu": _silu, torch.einsum: _einsum}


def _excluded(gm: fx.GraphModule, node: fx.Node, exclude) -> bool:
    if node.op == "call_module":
        return matches_names(node.target, gm.get_submodule(node.target), exclude)
    return any(node.target is e for e in exclude)


def decompose_ops(gm: fx.GraphModule, *, exclude=()) -> fx.GraphModule:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")  # module -> nodes calling it
    for node in list(gm.graph.nodes):
        decompose = DECOMPOSITIONS.get(op_key(gm, node))
        if decompose is None or _excluded(gm, node, exclude) or not node.args:
            continue
        module = node.target if node.op == "call_module" else None
        with gm.graph.inserting_before(node):
            found = decompose(gm.graph, node, node.args[0])
        if found is None:  # the decomposition declined (an einsum that is no matmul)
            continue
        first, target, args = found
        if first is not None and info(first).shape is None:
            info(first).shape, info(first).dtype = info(node).shape, info(node).dtype
        node.op, node.target, node.args, node.kwargs = "call_function", target, args, {}
        if module is not None:
            calls[module] -= 1
            if calls[module] == 0:  # its last caller is decomposed
                gm.delete_submodule(module)
    gm.recompile()
    return gm
