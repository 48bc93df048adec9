"""annotate_quant: match the backend's rule rows and write what to quantize into node.meta.

before:  %conv1 = call_module[conv1](%x);  %add = call_function[operator.add](%conv1, %y)
after:   the same graph; meta["fxquant"] of conv1: rule="conv", inputs={0: uint8}, weight=int8/axis 0,
         output=uint8; of add: rule="add", inputs={0: uint8, 1: uint8}, output=uint8.

Rows are tried in table order at each node; a chain row (add -> relu) claims every node it covers
and puts the output spec on its last node. Excluded nodes and non-float values are never claimed.
A share_inputs row (cat) marks its node share_inputs: insert_fake_quant puts every input on one
fake-quant. Weighted rows get the backend's bias spec (None: the bias stays float).

fake_quant ("ste", "lsq", "lsq+") and observer replace the backend's choice in every spec (lsq+ on a
symmetric spec is lsq). Weights are observed afresh each step, so they take only the observers that
choose a range on the latest tensor ("mse", "percentile", "current"); after "minmax" or "moving_average"
they keep the backend's.
layer_bits {module name (or a parent's): (w_bits, a_bits)} sets a layer's weight width and the width of
every activation it reads, at the fake-quant that produces that activation, so all its readers agree,
and of its own output when no quantized op reads it (the model's output):
    layer_bits={"fc": (8, 8)}: fc's weight, the avgpool output fc reads and the logits, at 8 bits.
Two layers that read one activation at different a_bits are an error.
The backend's deployment target then narrows the weight of every row with `pair_sums` (an integer GEMM
that adds pairs of products in int16 on some CPUs) until no pair sum can saturate with the activation it
reads (`Target.safe_weight`): on onnxruntime's portable target a conv's 8-bit weight becomes 7-bit
[-63, 63], a depthwise conv's stays 8-bit.
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx

from fxquant.backends import QUANTIZE, SHARE, SHARE_INPUTS, Backend, Rule, exposed_to_pair_sums
from fxquant.errors import FxQuantError
from fxquant.meta import KEY, info, matches_names, op_key
from fxquant.passes.trace_model import check_module_names
from fxquant.specs import QuantSpec, check_layer_bits


def _excluded(gm: fx.GraphModule, node: fx.Node, exclude) -> bool:
    if node.op == "call_module":
        return matches_names(node.target, gm.get_submodule(node.target), exclude)
    return node.op == "call_function" and node.target in [e for e in exclude if callable(e) and not isinstance(e, type)]


def _rule_key(gm: fx.GraphModule, node: fx.Node):
    """op_key, where a fused QAT module names the class the rows are written for (ConvBnAct2d -> ConvAct2d)."""
    key = op_key(gm, node)
    return getattr(key, "match_as", key) if isinstance(key, type) else key


def _match(gm, node, rule: Rule, claimed, exclude) -> list[fx.Node] | None:
    chain = []
    for step in rule.pattern:
        if node in claimed or _excluded(gm, node, exclude) or KEY not in node.meta or not info(node).is_float_tensor:
            return None
        if _rule_key(gm, node) not in step:
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


def _narrow(spec, bits: int):
    """`spec` narrowed to `bits`, never widened: a 7-bit reduce_range weight stays 7-bit at w_bits=8."""
    return spec if bits >= spec.bits else spec.with_bits(bits)


WEIGHT_OBSERVERS = ("current", "percentile", "mse")  # per channel they choose on the latest weight alone


def _kind(spec: QuantSpec, fake_quant: str | None, observer: str | None = None) -> QuantSpec:
    """`spec` with the call's fake-quant kind and observer (None keeps the backend's)."""
    if fake_quant is not None:
        spec = replace(spec, fake_quant="lsq" if fake_quant == "lsq+" and spec.symmetric else fake_quant)
    return spec if observer is None else replace(spec, observer=observer)


def _layers(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and KEY in n.meta and info(n).rule is not None
            and (n.target == name or n.target.startswith(name + "."))]


def _value_source(value: fx.Node) -> fx.Node:
    """The node whose output fake-quant `value` is on (through shared-qparam ops), else `value` itself."""
    node = value
    while KEY in node.meta and info(node).share and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node if KEY in node.meta and info(node).output is not None else value


def _set_activation_bits(value: fx.Node, bits: int, layer: str, owners: dict) -> None:
    src = _value_source(value)
    if owners.setdefault(src, (bits, layer))[0] != bits:
        raise FxQuantError(f"layer_bits: {layer!r} and {owners[src][1]!r} read activation '{src.name}' at "
                           f"{bits} and {owners[src][0]} bits; give them the same a_bits")
    if KEY in src.meta and info(src).output is not None:
        info(src).output = info(src).output.with_bits(bits)
    for reader in list(src.users) + list(value.users):
        specs = info(reader).inputs if KEY in reader.meta else {}
        for i, spec in specs.items():
            if reader.args[i] in (src, value):
                specs[i] = spec.with_bits(bits)


def _apply_layer_bits(gm: fx.GraphModule, layer_bits: dict, max_w_bits: int) -> None:
    owners: dict = {}
    for name, (w, a) in check_layer_bits(layer_bits):
        layers = _layers(gm, name) if isinstance(name, str) else []
        if not layers:
            known = sorted({n.target for n in gm.graph.nodes if n.op == "call_module" and KEY in n.meta and info(n).rule})
            raise FxQuantError(f"layer_bits: no quantized layer is named {name!r} (is it excluded, or misspelt?); "
                               f"quantized layers: {', '.join(known)}")
        for node in layers:
            if info(node).weight is not None:
                info(node).weight = info(node).weight.with_bits(min(w, max_w_bits))
            for i in list(info(node).inputs):
                _set_activation_bits(node.args[i], a, name, owners)
            if info(node).output is not None and not any(KEY in u.meta and info(u).rule for u in node.users):
                info(node).output = info(node).output.with_bits(a)  # leaves the model (logits): no reader decides


def _grouping(module) -> tuple[int, int, int]:
    """(groups, in channels, out channels) of a conv; (1, in, out) of a linear."""
    if hasattr(module, "in_features"):
        return 1, module.in_features, module.out_features
    return module.groups, module.in_channels, module.out_channels


def _fit_pair_sums(gm: fx.GraphModule, backend: Backend) -> None:
    """Narrow the weights of pair_sums rows so the target's narrowest accumulator cannot saturate."""
    for node in gm.graph.nodes:
        meta = info(node) if KEY in node.meta else None
        if meta is None or meta.weight is None or 0 not in meta.inputs or node.op != "call_module":
            continue
        if exposed_to_pair_sums(backend.rule(meta.rule), *_grouping(gm.get_submodule(node.target))):
            meta.weight = backend.target.safe_weight(meta.weight, meta.inputs[0])


def annotate_quant(gm: fx.GraphModule, *, backend: Backend, w_bits: int = 8, a_bits: int = 8, exclude=(),
                   fake_quant: str | None = None, observer: str | None = None, layer_bits=None) -> fx.GraphModule:
    check_module_names(gm, "exclude", exclude)  # here: the modules lift_functional made have names too
    weight = _kind(_narrow(backend.weight, w_bits), fake_quant, observer if observer in WEIGHT_OBSERVERS else None)
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for rule in backend.rules:
            chain = _match(gm, node, rule, claimed, exclude)
            if chain is None:
                continue
            claimed.update(chain)
            for n in chain:
                info(n).rule, info(n).kind = rule.name, rule.kind
            first = info(chain[0])
            act = _kind(_narrow(backend.spec_of(rule), a_bits), fake_quant, observer)
            if rule.kind == QUANTIZE:
                args = chain[0].args
                first.inputs = {
                    i: act for i in rule.inputs if i < len(args) and isinstance(args[i], fx.Node) and info(args[i]).is_float_tensor
                }
                first.weight = weight if rule.weight else None
                first.bias = backend.bias if rule.weight else None
                info(chain[-1]).output = act if rule.output else None
            first.share = rule.kind in (SHARE, SHARE_INPUTS)
            if rule.kind == SHARE_INPUTS:
                first.share_inputs, first.inputs = True, {0: act}
            break
    if layer_bits:
        _apply_layer_bits(gm, layer_bits, backend.weight.bits)
    _fit_pair_sums(gm, backend)
    return gm
