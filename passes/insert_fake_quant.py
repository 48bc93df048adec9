"""insert_fake_quant: put a FakeQuantize module on every value the annotations ask to quantize.

before:  %conv1 = call_module[conv1](%x)                      meta: inputs={0: uint8}, weight, output
after:   %x_fq     = call_module[x_fq](%x)                    # FakeQuantize(uint8, per-tensor)
         %conv1    = call_module[conv1](%x_fq)                # ConvAct2d with weight_fq (int8, axis 0)
         %conv1_fq = call_module[conv1_fq](%conv1)            # FakeQuantize(uint8), all users read it

A value gets one fake-quant however many quantized consumers read it. An input already on a
grid (the output of a fake-quant, or of a shared-qparam op such as maxpool) gets none.
"""

from __future__ import annotations

from torch import fx

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


def insert_fake_quant(gm: fx.GraphModule) -> fx.GraphModule:
    input_fq: dict[fx.Node, fx.Node] = {}  # value -> the fake-quant its quantized consumers read
    for node in list(gm.graph.nodes):
        if KEY not in node.meta or info(node).rule is None:
            continue
        for i, spec in info(node).inputs.items():
            arg = node.args[i]
            if qparams_source(gm, arg) is not None:
                continue
            if arg not in input_fq:
                input_fq[arg] = _new_fake_quant(gm, arg, spec)
            node.replace_input_with(arg, input_fq[arg])
        if info(node).weight is not None:
            _quantize_weight(gm, node, info(node).weight)
        if info(node).output is not None:
            fq = _new_fake_quant(gm, node, info(node).output)
            node.replace_all_uses_with(fq, delete_user_cb=lambda user: user is not fq)
    return gm
