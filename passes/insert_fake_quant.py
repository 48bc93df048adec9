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

from torch import fx

from fxquant.errors import FxQuantError
from fxquant.meta import KEY, info, qparams_source, set_module
from fxquant.nn import FakeQuantize, _WeightedAct, fused_class


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
    if not isinstance(module, _WeightedAct):
        module = fused_class(module).from_float(module)
        set_module(gm, node.target, module)
    module.weight_fq = FakeQuantize(spec, channels=module.weight.shape[spec.axis])


def _input_source(gm: fx.GraphModule, node: fx.Node, arg: fx.Node, spec, input_fq: dict) -> fx.Node:
    """The fake-quant node `node` reads `arg` through, made (and wired in) when `arg` is off-grid."""
    source = qparams_source(gm, arg)
    if source is None:
        if arg not in input_fq:
            input_fq[arg] = _new_fake_quant(gm, arg, spec)
        node.replace_input_with(arg, input_fq[arg])
        source = input_fq[arg]
    return source


def _share_inputs(gm: fx.GraphModule, node: fx.Node, spec, input_fq: dict) -> None:
    """Every fake-quant the inputs of `node` are on becomes a call of the first one's module."""
    tensors = [a for a in node.args[0] if isinstance(a, fx.Node) and info(a).is_float_tensor]
    sources = [_input_source(gm, node, a, spec, input_fq) for a in tensors]
    if not sources:
        return
    keep = sources[0].target
    merged = {s.target for s in sources} - {keep}
    for s in sources:
        if gm.get_submodule(s.target).spec != gm.get_submodule(keep).spec:
            raise FxQuantError(
                f"node '{node.name}' (rule {info(node).rule}) shares one set of qparams across its inputs, but "
                f"fake-quants '{keep}' and '{s.target}' have different specs; give those rows one spec in the backend table"
            )
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in merged:
            n.target = keep
    for target in merged:
        gm.delete_submodule(target)


def insert_fake_quant(gm: fx.GraphModule) -> fx.GraphModule:
    input_fq: dict[fx.Node, fx.Node] = {}  # value -> the fake-quant its quantized consumers read
    for node in list(gm.graph.nodes):
        if KEY not in node.meta or info(node).rule is None:
            continue
        if info(node).share_inputs:
            _share_inputs(gm, node, info(node).inputs[0], input_fq)
        else:
            for i, spec in info(node).inputs.items():
                _input_source(gm, node, node.args[i], spec, input_fq)
        if info(node).weight is not None:
            _quantize_weight(gm, node, info(node).weight)
        if info(node).output is not None:
            fq = _new_fake_quant(gm, node, info(node).output)
            node.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
    _bind_inputs(gm)
    return gm


def _bind_inputs(gm: fx.GraphModule) -> None:
    """Each weighted module learns its input's fake-quant (after cat merged any), to put its bias on s_x * s_w."""
    for node in gm.graph.nodes:
        if KEY in node.meta and info(node).weight is not None:
            source = qparams_source(gm, node.args[0])
            gm.get_submodule(node.target).bind_input(gm.get_submodule(source.target) if source is not None else None, info(node).bias)
