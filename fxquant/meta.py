"""What passes tell each other, kept on `node.meta["fxquant"]` (the one key fxquant owns)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from fxquant.specs import QuantSpec

KEY = "fxquant"


@dataclass
class NodeInfo:
    """shape/dtype come from running the example inputs (trace); the rest from annotate."""

    shape: tuple[int, ...] | None = None  # None: the value is not a tensor
    dtype: torch.dtype | None = None
    rule: str | None = None  # the backend row that claimed the node; None: stays float
    inputs: dict[int, QuantSpec] = field(default_factory=dict)  # positional arg -> its activation spec
    output: QuantSpec | None = None  # the output gets its own fake-quant
    share: bool = False  # the output carries its input's qparams (maxpool, flatten, ...)
    weight: QuantSpec | None = None  # the module's weight is fake-quantized with this spec
    bias: QuantSpec | None = None  # the bias is lowered to this integer spec (scale s_x * s_w); None: float
    share_inputs: bool = False  # every tensor in args[0] (cat's list) is put on ONE fake-quant, the output too
    kind: str | None = None  # the kind of the row that claimed the node (quantize, share, float...), for the report
    leaf: str | None = None  # trace kept this call whole (not traced into): why, and where tracing broke

    @property
    def is_float_tensor(self) -> bool:
        return self.shape is not None and self.dtype is not None and self.dtype.is_floating_point


def info(node: fx.Node) -> NodeInfo:
    """The node's NodeInfo, created empty when a pass made the node."""
    return node.meta.setdefault(KEY, NodeInfo())


def op_key(gm: fx.GraphModule, node: fx.Node):
    """What a backend rule matches on: the module type, the function, or the method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def set_module(gm: fx.GraphModule, qualname: str, module: torch.nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def matches_names(qualname: str, module: torch.nn.Module, names) -> bool:
    """True when `names` holds the module's qualified name (or a parent's) or one of its types."""
    for item in names:
        if isinstance(item, type) and isinstance(module, item):
            return True
        if isinstance(item, str) and (qualname == item or qualname.startswith(item + ".")):
            return True
    return False


def qparams_source(gm: fx.GraphModule, node, cache: dict | None = None) -> fx.Node | None:
    """The FakeQuantize node whose qparams `node`'s value is on, following shared-qparam ops; or None.

    `cache` (node -> answer) makes repeated calls linear on long share chains (densenet's cat of cats);
    it is only valid while the nodes it holds keep their inputs.
    """
    from fxquant.nn import FakeQuantize

    cache = {} if cache is None else cache
    walked, source = [], None
    while isinstance(node, fx.Node):
        if node in cache:
            source = cache[node]
            break
        walked.append(node)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize):
            source = node
            break
        if KEY not in node.meta or not node.meta[KEY].share:
            break
        node = node.args[0]
        if isinstance(node, (list, tuple)) and node:  # cat: its inputs share one fake-quant
            node = node[0]
    cache.update(dict.fromkeys(walked, source))
    return source
