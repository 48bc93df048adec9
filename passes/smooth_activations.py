"""smooth_activations: SmoothQuant's per-channel migration of an activation's range into the weight that reads it.

before:  %gelu = call_function[F.gelu](%fc1)
         %fc2  = call_module[fc2](%gelu)                         # nn.Linear, W (out, in)
after:   %fc2_smooth = call_module[fc2_smooth](%gelu)            # ChannelScale: x * (1 / s), float, by rule
         %fc2  = call_module[fc2](%fc2_smooth)                   # W * s (column j scaled by s_j)

Xiao et al. 2023 (SmoothQuant): a transformer's activations have a few channels far larger than the rest,
so one per-tensor scale leaves the others a handful of codes. Per input channel j,
    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)
and (X / s) (W s)^T = X W^T exactly in float; the activation's channels become even, the weight's columns
absorb the range (per output channel, their scales barely move). The Linear layers rewritten are those that
read a GELU (a transformer's FFN output layer: the GELU's heavy tail is what int8 loses on BERT), where no
op before the layer can absorb 1/s, so it stays an explicit float multiply (one elementwise Mul in ONNX).
max|X_j| comes from running the traced float graph on `calib_data`. Excluded layers are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.inputs import batch_inputs
from fxquant.meta import info, matches_names, op_key, set_module
from fxquant.traceable import ChannelScale

GELU = (nn.GELU, F.gelu)


def _targets(gm: fx.GraphModule, exclude) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.Linear
            and not matches_names(n.target, gm.get_submodule(n.target), exclude)
            and isinstance(n.args[0], fx.Node) and op_key(gm, n.args[0]) in GELU]


@torch.no_grad()
def _channel_max(gm: fx.GraphModule, nodes, calib_data) -> dict:
    """max |x_j| per input channel of each node's Linear, over the calibration batches."""
    found, hooks = {}, []
    for node in nodes:
        def hook(module, args, name=node.target):
            x = args[0].detach().abs().flatten(0, -2).amax(0)
            found[name] = x if name not in found else torch.maximum(found[name], x)
        hooks.append(gm.get_submodule(node.target).register_forward_pre_hook(hook))
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    was_training = gm.training
    gm.eval()
    try:
        for i, batch in enumerate(calib_data):
            gm(*batch_inputs(batch, len(names), i, names))
    finally:
        for h in hooks:
            h.remove()
        gm.train(was_training)
    return found


def smooth_activations(gm: fx.GraphModule, *, calib_data, alpha: float = 0.5, exclude=()) -> fx.GraphModule:
    nodes = _targets(gm, exclude)
    if not nodes:
        return gm
    gm.recompile()
    x_max = _channel_max(gm, nodes, calib_data)
    for node in nodes:
        linear = gm.get_submodule(node.target)
        w_max = linear.weight.detach().abs().amax(0)
        s = (x_max[node.target].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        smoothed = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        smoothed.weight = nn.Parameter(linear.weight.detach() * s, linear.weight.requires_grad)
        if linear.bias is not None:
            smoothed.bias = linear.bias
        set_module(gm, node.target, smoothed)  # a new module: the user's model keeps its weight
        name = node.target.replace(".", "_") + "_smooth"
        gm.add_submodule(name, ChannelScale(1.0 / s))
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_module(name, (node.args[0],))
        info(scaled).shape, info(scaled).dtype = info(node.args[0]).shape, info(node.args[0]).dtype
        node.args = (scaled, *node.args[1:])
    return gm
