"""annotate_quant: match the backend's rule rows and write what to quantize into node.meta.

before:  %conv1 = call_module[conv1](%x);  %add = call_function[operator.add](%conv1, %y)
after:   the same graph; meta["fxquant"] of conv1: rule="conv", inputs={0: uint8}, weight=int8/axis 0,
         output=uint8; of add: rule="add", inputs={0: uint8, 1: uint8}, output=uint8.

Rows are tried in table order at each node; a chain row (add -> relu) claims every node it covers
and puts the output spec on its last node. Excluded nodes and non-float values are never claimed.
"""

from __future__ import annotations

from torch import fx

from fxquant.backends import QUANTIZE, SHARE, Backend, Rule
from fxquant.meta import KEY, info, matches_names, op_key


def _excluded(gm: fx.GraphModule, node: fx.Node, exclude) -> bool:
    if node.op == "call_module":
        return matches_names(node.target, gm.get_submodule(node.target), exclude)
    return node.op == "call_function" and node.target in [e for e in exclude if callable(e) and not isinstance(e, type)]


def _match(gm, node, rule: Rule, claimed, exclude) -> list[fx.Node] | None:
    chain = []
    for step in rule.pattern:
        if node in claimed or _excluded(gm, node, exclude) or KEY not in node.meta or not info(node).is_float_tensor:
            return None
        if op_key(gm, node) not in step:
            return None
        chain.append(node)
        if len(chain) < len(rule.pattern):
            if len(node.users) != 1:
                return None
            node = next(iter(node.users))
    if rule.check is not None:
        first = chain[0]
        if not rule.check(gm.get_submodule(first.target) if first.op == "call_module" else None, first):
            return None
    return chain


def annotate_quant(gm: fx.GraphModule, *, backend: Backend, w_bits: int = 8, a_bits: int = 8, exclude=()) -> fx.GraphModule:
    act, weight = backend.activation.with_bits(a_bits), backend.weight.with_bits(w_bits)
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for rule in backend.rules:
            chain = _match(gm, node, rule, claimed, exclude)
            if chain is None:
                continue
            claimed.update(chain)
            for n in chain:
                info(n).rule = rule.name
            first = info(chain[0])
            if rule.kind == QUANTIZE:
                args = chain[0].args
                first.inputs = {
                    i: act for i in rule.inputs if i < len(args) and isinstance(args[i], fx.Node) and info(args[i]).is_float_tensor
                }
                first.weight = weight if rule.weight else None
                info(chain[-1]).output = act if rule.output else None
            first.share = rule.kind == SHARE
            break
    return gm
