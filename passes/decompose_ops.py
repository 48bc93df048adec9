"""decompose_ops: rewrite composite activations into the primitive ops the backend rows quantize.

before:  %act = call_module[target=act](%conv)                        # nn.SiLU (or F.silu, x.silu())
after:   %act_sigmoid = call_function[torch.sigmoid](%conv)
         %act = call_function[operator.mul](%conv, %act_sigmoid)      # silu(x) = x * sigmoid(x)

ONNX Runtime has no integer SiLU, but it has QLinearSigmoid and QLinearMul: decomposed, an
EfficientNet runs integer end to end instead of leaving every activation in float. The last node
keeps the original name (layers line up across stages); excluded modules and functions stay whole.
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


DECOMPOSITIONS = {nn.SiLU: _silu, F.silu: _silu, "silu": _silu}


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
            first, target, args = decompose(gm.graph, node, node.args[0])
        info(first).shape, info(first).dtype = info(node).shape, info(node).dtype
        node.op, node.target, node.args, node.kwargs = "call_function", target, args, {}
        if module is not None:
            calls[module] -= 1
            if calls[module] == 0:  # its last caller is decomposed
                gm.delete_submodule(module)
    gm.recompile()
    return gm
