"""fuse_modules: fold BatchNorm into the conv/linear before it, then fuse the ReLU/ReLU6 after it.

before:  %conv1 = call_module[conv1](%x)      # nn.Conv2d
         %bn1   = call_module[bn1](%conv1)    # nn.BatchNorm2d
         %relu  = call_function[F.relu](%bn1)  # or nn.ReLU, torch.relu, x.relu_(), nn.ReLU6, F.relu6
after:   %conv1 = call_module[conv1](%x)      # fxquant.nn.ConvAct2d(act="relu"), BN folded in its weight

A step fuses only when the producer has a single user and its module is called once.

    w' = w * gamma / sqrt(var + eps)          (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

qat=True keeps the BN alive for training: %conv1 becomes fxquant.nn.ConvBnAct2d (the conv and the
BN in one module, the BN folded into the fake-quantized weight on every forward; see its docstring),
a linear followed by BatchNorm1d fxquant.nn.LinearBnAct.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.meta import info, op_key, set_module
from fxquant.nn import BN_FOLDED_CLASSES, fused_class

BATCHNORMS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}


def _base(module: nn.Module) -> type:
    """The torch.nn layer class a (fused) conv/linear module is: nn.Conv1d/2d/3d or nn.Linear."""
    return next(base for base in BATCHNORMS if isinstance(module, base))
ACTS = {
    nn.ReLU: "relu", F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", "relu": "relu", "relu_": "relu",
    nn.ReLU6: "relu6", F.relu6: "relu6",
}


def _fusable_producer(gm: fx.GraphModule, node: fx.Node, calls: Counter):
    """The conv/linear module feeding `node` alone, or None."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    if calls[src.target] != 1:
        return None  # a module called twice cannot absorb one call's BN or activation
    module = gm.get_submodule(src.target)
    return (src, module) if fused_class(module) is not None else None


@torch.no_grad()
def _fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    layer.weight.copy_(layer.weight * factor.reshape(-1, *[1] * (layer.weight.dim() - 1)))
    layer.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)


def _is_bn_for(src: fx.Node, module: nn.Module, bn: nn.Module) -> bool:
    if getattr(module, "act", None) is not None:
        return False  # conv -> relu -> bn: the BN sees activated values, nothing to fold
    base = _base(module)
    if base is nn.Linear and (info(src).shape is None or len(info(src).shape) != 2):
        return False  # linear on (N, L, C): BatchNorm1d normalizes axis 1, not the output features
    return type(bn) is BATCHNORMS[base] and bn.track_running_stats and bn.running_mean is not None


def _bypass(gm: fx.GraphModule, node: fx.Node, src: fx.Node, calls: Counter) -> None:
    """Remove `node` (its users read `src`); drop its module unless another call still uses it."""
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)
    if node.op == "call_module":
        calls[node.target] -= 1
        if calls[node.target] == 0:
            gm.delete_submodule(node.target)


def fuse_modules(gm: fx.GraphModule, *, qat: bool = False) -> fx.GraphModule:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        found = _fusable_producer(gm, node, calls)
        if found is None or not _is_bn_for(*found, gm.get_submodule(node.target)):
            continue
        src, module = found
        if qat:
            bn_folded = BN_FOLDED_CLASSES[_base(module)]
            set_module(gm, src.target, bn_folded.from_layer_bn(module, gm.get_submodule(node.target)))
        else:
            _fold_bn(module, gm.get_submodule(node.target))
        _bypass(gm, node, src, calls)

    for node in list(gm.graph.nodes):
        act = ACTS.get(op_key(gm, node))
        found = _fusable_producer(gm, node, calls) if act else None
        if found is None or getattr(found[1], "act", None) is not None:
            continue
        src, module = found
        set_module(gm, src.target, fused_class(module).from_float(module, act=act))
        _bypass(gm, node, src, calls)
    return gm
