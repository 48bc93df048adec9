"""insert_fake_quant: put a FakeQuantize module on every value the annotations ask to quantize.

before:  %conv1 = call_module[conv1](%x)                      meta: inputs={0: uint8}, weight, output
after:   %x_fq     = call_module[x_fq](%x)                    # FakeQuantize(uint8, per-tensor)
         %conv1    = call_module[conv1](%x_fq)                # ConvAct2d with weight_fq (int8, axis 0)
         %conv1_fq = call_module[conv1_fq](%conv1)            # FakeQuantize(uint8), all users read it

A value gets one fake-quant however many quantized consumers read it. An input already on a
grid (the output of a fake-quant, or of a shared-qparam op such as maxpool) gets none. Each weighted
module is told its input's fake-quant, so its bias is fake-quantized on the int32 grid s_x * s_w.

A share_inputs node (cat) puts all its inputs on ONE set of qparams: the fake-quants its inputs
are on become calls of one FakeQuantize module, whose observer sees every input:
    %a_fq = call_module[a_fq](%a);  %b_fq = call_module[b_fq](%b);  %cat = torch.cat([%a_fq, %b_fq])
 -> %a_fq = call_module[a_fq](%a);  %b_fq = call_module[a_fq](%b);  %cat = torch.cat([%a_fq, %b_fq])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from fxquant.errors import FxQuantError
from fxquant.meta import KEY, info, qparams_source, set_module
from fxquant.nn import FakeQuantize, WeightedAct, fused_class


def _new_fake_quant(gm: fx.GraphModule, value: fx.Node, spec) -> fx.Node:
    name = f"{value.name}_fq"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, FakeQuantize(spec))
    if value.op == "placeholder":  # keep the placeholders together at the top
        where = gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder"))
    else:
        where = gm.graph.inserting_after(value)
    with where:
        fq = gm.graph.call_module(name, (value,))
    info(fq).shape, info(fq).dtype = info(value).shape, info(value).dtype
    return fq


def _quantize_weight(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    module = gm.get_submodule(node.target)
    if not isinstance(module, WeightedAct):
        module = fused_class(module).from_float(module)
        set_module(gm, node.target, module)
    module.weight_fq = FakeQuantize(spec, channels=module.weight.shape[spec.axis], of_weight=True)


@dataclass
class _Placed:
    """What insert_fake_quant has placed so far."""

    input_fq: dict[fx.Node, fx.Node] = field(default_factory=dict)  # value -> the fake-quant its consumers read
    merged: dict[str, str] = field(default_factory=dict)  # fake-quant module -> the one a cat merged it into
    # qparams_source's cache: valid because nodes are visited in order, and only the node being
    # visited or later ones get new inputs
    sources: dict[fx.Node, fx.Node | None] = field(default_factory=dict)


def _input_source(gm: fx.GraphModule, node: fx.Node, arg: fx.Node, spec, placed: _Placed) -> fx.Node:
    """The fake-quant node `node` reads `arg` through, made (and wired in) when `arg` is off-grid."""
    source = qparams_source(gm, arg, placed.sources)
    if source is None:
        if arg not in placed.input_fq:
            placed.input_fq[arg] = _new_fake_quant(gm, arg, spec)
        node.replace_input_with(arg, placed.input_fq[arg])
        source = placed.input_fq[arg]
    return source


def _root(merged: dict[str, str], target: str) -> str:
    while target in merged:
        target = merged[target]
    return target


def _share_inputs(gm: fx.GraphModule, node: fx.Node, spec, placed: _Placed) -> None:
    """Every fake-quant the inputs of `node` are on is merged (placed.merged) into the first one's module."""
    merged = placed.merged
    tensors = [a for a in node.args[0] if isinstance(a, fx.Node) and info(a).is_float_tensor]
    roots = [_root(merged, _input_source(gm, node, a, spec, placed).target) for a in tensors]
    for target in roots[1:]:
        if gm.get_submodule(target).spec != gm.get_submodule(roots[0]).spec:
            raise FxQuantError(
                f"node '{node.name}' (rule {info(node).rule}) shares one set of qparams across its inputs, but "
                f"fake-quants '{roots[0]}' and '{target}' have different specs; give those rows one spec in the backend table"
            )
        if target != roots[0]:
            merged[target] = roots[0]


def _apply_merges(gm: fx.GraphModule, merged: dict[str, str]) -> None:
    """One sweep: calls of a merged fake-quant call the module it was merged into (cat chains resolved)."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in merged:
            n.target = _root(merged, n.target)
    for target in merged:
        gm.delete_submodule(target)


def insert_fake_quant(gm: fx.GraphModule) -> fx.GraphModule:
    placed = _Placed()
    for node in list(gm.graph.nodes):
        if KEY not in node.meta or info(node).rule is None:
            continue
        if info(node).share_inputs:
            _share_inputs(gm, node, info(node).inputs[0], placed)
        else:
            for i, spec in info(node).inputs.items():
                _input_source(gm, node, node.args[i], spec, placed)
        if info(node).weight is not None:
            _quantize_weight(gm, node, info(node).weight)
        if info(node).output is not None:
            fq = _new_fake_quant(gm, node, info(node).output)
            node.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
    _apply_merges(gm, placed.merged)
    _bind_inputs(gm)
    return gm


def _bind_inputs(gm: fx.GraphModule) -> None:
    """Each weighted module learns its input's fake-quant (after cat merged any), to put its bias on s_x * s_w."""
    sources = {}
    for node in gm.graph.nodes:
        if KEY in node.meta and info(node).weight is not None:
            source = qparams_source(gm, node.args[0], sources)
            gm.get_submodule(node.target).bind_input(gm.get_submodule(source.target) if source is not None else None, info(node).bias)
