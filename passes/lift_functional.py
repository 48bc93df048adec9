"""lift_functional: a functional conv / linear / batch_norm on the model's own tensors becomes a module call.

before:  %conv_weight = get_attr[target=conv.weight]
         %conv_bias   = get_attr[target=conv.bias]
         %conv2d      = call_function[F.conv2d](%x, %conv_weight, %conv_bias, 1, 1)   # a custom conv's forward
after:   %conv2d      = call_module[target=conv.conv2d](%x)    # nn.Conv2d sharing conv.weight and conv.bias

    F.conv1d / conv2d / conv3d (input, weight, bias=None, stride, padding, dilation, groups)
                                                     -> nn.Conv1d / Conv2d / Conv3d
    F.linear (input, weight, bias=None)               -> nn.Linear
    F.batch_norm (input, running_mean, running_var, weight, bias, training, momentum, eps)
                                                     -> nn.BatchNorm1d / 2d / 3d by the input's rank
    torch.addmm (bias, input, weight (in, out))      -> nn.Linear (weight: a transposed view)

so the later passes treat them as the modules they are: fuse_modules folds a (functional) batch norm
into the conv before it, including a model library's BatchNorm-with-activation module that calls
F.batch_norm itself, and the backend rows quantize the conv with per-channel weights from the
parameter. The module shares the parameter and buffer objects (training updates them in place) and
is registered as a child of the module that owns the weight, named after the function ("conv2d",
"linear", "batch_norm"), so `exclude`/`layer_bits` given the owner's name reach it. A call whose
weight (or statistics) is computed in the forward (weight standardisation), or whose other arguments
are not constants, is left as it is: it runs in float, and fxquant.report lists it.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.meta import info

CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
LINEAR_ARGS = ("input", "weight", "bias")
BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _bound(node: fx.Node, names, defaults) -> dict | None:
    """The call's arguments by name (positional or keyword, defaults filled in), or None if one is missing."""
    args = dict(defaults)
    args.update(zip(names, node.args))
    args.update(node.kwargs)
    return args if set(names) <= set(args) and len(node.args) <= len(names) else None


def _tensor_attr(gm: fx.GraphModule, a) -> torch.Tensor | None:
    """The parameter or buffer a get_attr node reads (None for anything else)."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return None
    value = gm.get_submodule(a.target.rpartition(".")[0]) if "." in a.target else gm
    value = getattr(value, a.target.rpartition(".")[2], None)
    return value if isinstance(value, torch.Tensor) else None


def _as_parameter(t: torch.Tensor | None) -> nn.Parameter | None:
    if t is None or isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t, requires_grad=False)  # a buffer used as a weight: shares its storage


def _static_size(a):
    """A size read off a tensor's shape (x.shape[1], x.size(1)) whose dimension is not the batch: an int
    (shapes past the batch are fixed by the example inputs); anything else comes back as it is."""
    if not isinstance(a, fx.Node):
        return a
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        shape, index = a.args
        is_shape = shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape"
        source = shape.args[0] if is_shape else None
    elif a.op == "call_method" and a.target == "size" and len(a.args) == 2:
        source, index = a.args
    else:
        return a
    dims = info(source).shape if isinstance(source, fx.Node) else None
    if dims is None or not isinstance(index, int) or index % len(dims) == 0:
        return a
    return dims[index]


def _constants(args: dict, tensors) -> bool:
    """Every argument but the input and the named tensor ones is a plain value (no graph node), once sizes
    read off a shape (groups=x.shape[1]) are replaced by their values."""
    for k, v in args.items():
        if k != "input" and k not in tensors:
            args[k] = _static_size(v)
    return not any(isinstance(v, fx.Node) for k, v in args.items() if k != "input" and k not in tensors)


def _conv(gm, node):
    args = _bound(node, CONV_ARGS, CONV_DEFAULTS)
    if args is None or not _constants(args, ("weight", "bias")):
        return None
    w, b = _tensor_attr(gm, args["weight"]), _tensor_attr(gm, args["bias"])
    if w is None or (args["bias"] is not None and b is None):
        return None
    groups = args["groups"]
    conv = CONVS[node.target](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=args["stride"],
                              padding=args["padding"], dilation=args["dilation"], groups=groups, bias=b is not None)
    conv.weight, conv.bias = _as_parameter(w), _as_parameter(b)
    return conv, args["weight"]


def _linear(gm, node):
    args = _bound(node, LINEAR_ARGS, {"bias": None})
    if args is None or not _constants(args, ("weight", "bias")):
        return None
    w, b = _tensor_attr(gm, args["weight"]), _tensor_attr(gm, args["bias"])
    if w is None or w.dim() != 2 or (args["bias"] is not None and b is None):
        return None
    linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    linear.weight, linear.bias = _as_parameter(w), _as_parameter(b)
    return linear, args["weight"]


def _batch_norm(gm, node):
    args = _bound(node, BN_ARGS, BN_DEFAULTS)
    tensors = ("running_mean", "running_var", "weight", "bias")
    if args is None or not _constants(args, tensors) or info(args["input"]).shape is None:
        return None
    found = {k: _tensor_attr(gm, args[k]) for k in tensors}
    if found["running_mean"] is None or found["running_var"] is None:
        return None  # batch statistics only: nothing to fold
    if any(args[k] is not None and found[k] is None for k in ("weight", "bias")) or (found["weight"] is None) != (found["bias"] is None):
        return None
    cls = BATCH_NORMS.get(len(info(args["input"]).shape))
    if cls is None or args["momentum"] is None:
        return None
    bn = cls(found["running_mean"].numel(), eps=float(args["eps"]), momentum=float(args["momentum"]),
             affine=found["weight"] is not None)
    bn.running_mean, bn.running_var = found["running_mean"], found["running_var"]  # the owner's buffers, shared
    if bn.affine:
        bn.weight, bn.bias = _as_parameter(found["weight"]), _as_parameter(found["bias"])
    bn.train(bool(args["training"]))
    return bn, args["running_mean"]


def _addmm(gm, node):
    """torch.addmm(bias, x, w) = x @ w + bias with w stored (in, out): GPT-2's Conv1D as HFTracer traces it."""
    args = _bound(node, ("bias", "input", "weight"), {})
    if args is None or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    w, b = _tensor_attr(gm, args["weight"]), _tensor_attr(gm, args["bias"])
    if w is None or b is None or w.dim() != 2 or b.shape != (w.shape[1],):
        return None
    linear = nn.Linear(w.shape[0], w.shape[1])
    # a transposed view of w (the owner's storage, so QAT's updates reach it), trainable when w is
    linear.weight, linear.bias = nn.Parameter(w.detach().t(), requires_grad=w.requires_grad), _as_parameter(b)
    return linear, args["weight"]


LIFTS = {**dict.fromkeys(CONVS, _conv), F.linear: _linear, F.batch_norm: _batch_norm, torch.addmm: _addmm}


def _child_name(gm: fx.GraphModule, owner: str, base: str) -> str:
    parent = gm.get_submodule(owner) if owner else gm
    name, i = base, 1
    while hasattr(parent, name):
        name, i = f"{base}_{i}", i + 1
    return f"{owner}.{name}" if owner else name


def lift_functional(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        lift = LIFTS.get(node.target) if node.op == "call_function" else None
        found = lift(gm, node) if lift is not None else None
        if found is None:
            continue
        module, weight = found
        owner = weight.target.rpartition(".")[0]
        qualname = _child_name(gm, owner, node.target.__name__)
        gm.get_submodule(owner).add_module(qualname.rpartition(".")[2], module) if owner else gm.add_module(qualname, module)
        x = node.args[1] if node.target is torch.addmm else node.args[0] if node.args else node.kwargs["input"]
        reads = node.all_input_nodes
        node.op, node.target, node.args, node.kwargs = "call_module", qualname, (x,), {}
        for a in reads:
            if a.op == "get_attr" and not a.users:
                gm.graph.erase_node(a)
    gm.recompile()
    return gm
