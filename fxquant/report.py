"""fxquant.report(qmodel): what happened to each op, read from the graph's node.meta["fxquant"].

    >>> print(fxquant.report(qmodel))
    57 ops: 21 quantized, 30 on their input's grid, 4 float by rule, 2 without a rule
    leaves (kept whole by trace, run in float):
      body_gate      Gate          torch.fx cannot trace it at net.py:12 `if x.sum() > 0:`: TraceError: ...
    float by rule:
      ln_1           LayerNorm     row layer_norm
    no rule (float):
      cumsum         cumsum
    weight scales raised so the int32 bias fits (those channels lose weight precision):
      dw             channels [0]

A channel whose bias cannot be stored on the int32 grid s_x * s_w (near-zero weights, a real bias: a
dead BatchNorm channel folded in) gets a larger weight scale (fxquant.nn.WeightedAct.bias_scale_floor);
`raised` lists them as of the latest forward (calibration) or convert.

An op counts when it is a call that yields a float tensor (shape arithmetic does not) or a leaf and
reads an activation: math on parameters alone (Swin V2's clamp(logit_scale).exp()) computes a
constant, no activation to quantize. The fake-quant modules, and the quantize/dequantize nodes of a
converted graph, are fxquant's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxquant.errors import FxQuantError
from fxquant.meta import KEY, op_key
from fxquant.pending import PendingQuantization, not_run_yet


@dataclass(frozen=True)
class Op:
    """One op of the graph: its node name, what it calls, the row that claimed it (or None), and its kind."""

    name: str
    op: str
    rule: str | None = None
    kind: str | None = None  # quantize, share, share_inputs, float; None: no row claimed it
    leaf: str | None = None  # why trace kept the call whole, if it did


@dataclass(frozen=True)
class Report:
    ops: tuple[Op, ...]
    raised: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (layer, output channels whose weight scale the bias raised)

    def _where(self, test) -> tuple[Op, ...]:
        return tuple(o for o in self.ops if test(o))

    @property
    def quantized(self) -> tuple[Op, ...]:
        """Claimed by a quantize row: an integer kernel in the backend."""
        return self._where(lambda o: o.kind == "quantize")

    @property
    def shared(self) -> tuple[Op, ...]:
        """Claimed by a share row: moves values on its input's grid (maxpool, reshape, cat)."""
        return self._where(lambda o: o.kind in ("share", "share_inputs"))

    @property
    def float_by_rule(self) -> tuple[Op, ...]:
        return self._where(lambda o: o.kind == "float")

    @property
    def no_rule(self) -> tuple[Op, ...]:
        """No row claimed these: they run in float, between a dequantize and the next quantize."""
        return self._where(lambda o: o.kind is None)

    @property
    def leaves(self) -> tuple[Op, ...]:
        """Calls trace kept whole that run in float (a wrapped function a share row claims is not listed)."""
        return self._where(lambda o: o.leaf is not None and o.kind in (None, "float"))

    def __str__(self) -> str:
        lines = [f"{len(self.ops)} ops: {len(self.quantized)} quantized, {len(self.shared)} on their input's grid, "
                 f"{len(self.float_by_rule)} float by rule, {len(self.no_rule)} without a rule"]
        sections = (("leaves (kept whole by trace, run in float)", self.leaves, lambda o: o.leaf),
                    ("float by rule", self.float_by_rule, lambda o: f"row {o.rule}"),
                    ("no rule (float)", self.no_rule, lambda o: ""))
        for title, ops, why in sections:
            if ops:
                width = max(len(o.name) for o in ops)
                lines += [f"{title}:"] + [f"  {o.name:<{width}}  {o.op:<20}  {why(o)}".rstrip() for o in ops]
        if self.raised:
            width = max(len(name) for name, _ in self.raised)
            lines += ["weight scales raised so the int32 bias fits (those channels lose weight precision):"]
            lines += [f"  {name:<{width}}  channels {list(channels)}" for name, channels in self.raised]
        return "\n".join(lines)


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    key = op_key(gm, node)
    return getattr(key, "__name__", str(key))


def _is_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    from fxquant.nn import FakeQuantize
    from fxquant.numerics import dequantize, quantize

    if not node.op.startswith("call_") or KEY not in node.meta:
        return False
    if not node.meta[KEY].is_float_tensor and node.meta[KEY].leaf is None:  # a leaf may return a tuple
        return False
    if node.op == "call_module":
        return not isinstance(gm.get_submodule(node.target), FakeQuantize)
    return node.target not in (quantize, dequantize)


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """The calls whose inputs are all parameters, buffers or other such calls (no placeholder upstream)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op.startswith("call_") and inputs and all(n.op == "get_attr" or n in found for n in inputs):
            found.add(node)
    return found


def report(gm: fx.GraphModule) -> Report:
    """The Report of a GraphModule made by fxquant (fake-quant from quantize(), or int8 from convert())."""
    if isinstance(gm, PendingQuantization):
        raise not_run_yet("report")
    if not isinstance(gm, fx.GraphModule) or not any(KEY in n.meta for n in gm.graph.nodes):
        raise FxQuantError("report: expected a GraphModule from fxquant.quantize() or fxquant.convert()")
    ops, constants = [], _constants(gm)
    for node in gm.graph.nodes:
        if _is_op(gm, node) and node not in constants:
            meta = node.meta[KEY]
            ops.append(Op(node.name, _op_name(gm, node), meta.rule, meta.kind, meta.leaf))
    return Report(tuple(ops), _raised(gm))


def _raised(gm: fx.GraphModule) -> tuple:
    """(layer, channels) of each weighted layer whose weight scale its bias raised (fxquant.nn.WeightedAct)."""
    from fxquant.nn import WeightedAct

    found = []
    for name, module in gm.named_modules():
        if isinstance(module, WeightedAct) and module.raised_channels:
            found.append((name, tuple(module.raised_channels)))
    return tuple(found)
