"""Leaves in the ONNX file: a call fx kept whole, or a float op no converter knows, is exported by torch.onnx
and inlined under its node's name.

    %attn = call_module[target=blocks.0.attn](%x_dq)       # a module trace_model kept whole, a wrapped function
 -> attn/in0 = Identity(x_dq)
    ...torch.onnx's graph of that call, every name prefixed "attn/"...
    (the FX node's value is attn/out0, attn/out1, ...)

A leaf runs in float between DQ and Q: no backend row claims it, and fxquant.report() lists it.
torch.onnx (the TorchScript exporter) traces the call once on tensors of the recorded shapes, its
non-tensor arguments fixed; inputs that come from the model's inputs keep a dynamic batch dimension.
A leaf that reads tensor values is refused before it gets here (fxquant.onnx.walk: `needs_values`).
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from onnx import compose, helper
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.onnx.emitter import Value


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a (nested) result, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _rebuild(value, names):
    """`value` with each tensor replaced by the next ONNX name from `names`."""
    if isinstance(value, torch.Tensor):
        return next(names)
    if isinstance(value, dict):
        return {k: _rebuild(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_rebuild(v, names) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple takes fields
    return value


class _Method:
    """A call_method node's call: _Method("sum")(x, 1) is x.sum(1)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, obj, *args, **kwargs):
        return getattr(obj, self.name)(*args, **kwargs)


class _Call(nn.Module):
    """The leaf call with its tensor arguments as inputs and the tensors of its result as outputs."""

    def __init__(self, fn, node: fx.Node, values: dict, inputs: list[fx.Node]):
        super().__init__()
        self.fn = fn  # a module's parameters become initializers of the exported graph
        self.node, self.values, self.inputs = node, values, inputs

    def forward(self, *tensors):
        env = dict(zip(self.inputs, tensors))
        pick = lambda n: env[n] if n in env else self.values[n]  # noqa: E731
        out = self.fn(*fx.node.map_arg(self.node.args, pick), **fx.node.map_arg(self.node.kwargs, pick))
        return tuple(_tensors(out))


def _example(value: torch.Tensor) -> torch.Tensor:
    """A real tensor for torch.onnx to trace with: the value itself, or random data of a meta tensor's shape."""
    if value.device.type != "meta":
        return value
    if value.is_floating_point():
        return torch.randn(value.shape, dtype=value.dtype)
    return torch.zeros(value.shape, dtype=value.dtype)


def _export(call: _Call, examples: tuple, dynamic: list[bool], opset: int, name: str, what: str) -> onnx.ModelProto:
    ins = [f"in{i}" for i in range(len(examples))]
    axes = {n: {0: "batch"} for n, d in zip(ins, dynamic) if d}
    f = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic; the trace is per shape by design
            torch.onnx.export(call, examples, f, dynamo=False, opset_version=opset, input_names=ins, dynamic_axes=axes)
    except Exception as exc:
        why = str(exc).splitlines()[0] if str(exc) else ""
        raise FxQuantError(f"export_onnx: node '{name}' ({what}) runs in float and torch.onnx cannot export it: "
                           f"{type(exc).__name__}: {why}. Fix: write it with ops torch.onnx exports, or leave it out "
                           "of the model you export") from exc
    sub = onnx.load_from_string(f.getvalue())
    if any(o.domain not in ("", "ai.onnx") for o in sub.opset_import) or sub.functions:
        raise FxQuantError(f"export_onnx: leaf '{name}' exported to custom ONNX domains or functions; not inlined")
    return compose.add_prefix(sub, f"{name}/")


def _what(e, node: fx.Node) -> str:
    """The op a node calls, for messages: a module's type, a function's or a method's name."""
    if node.op == "call_module":
        return f"module {type(e.gm.get_submodule(node.target)).__name__}"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def inline_leaf(e, node: fx.Node):
    """Export the call of `node` with torch.onnx and add its nodes and initializers to emitter `e`."""
    if node.op == "call_module":
        fn = e.gm.get_submodule(node.target)
    elif node.op == "call_method":
        fn = _Method(node.target)
    else:
        fn = node.target
    inputs = [a for a in node.all_input_nodes if isinstance(e.tensor_of(a), torch.Tensor)]
    fixed = [a.name for a in node.all_input_nodes if a not in inputs and a in e.batch_values]
    if fixed:
        raise FxQuantError(f"export_onnx: leaf '{node.name}' reads {fixed}, sizes that follow the batch, as Python values: "
                           "its exported trace would fix them. Export with dynamic_batch=False")
    call = _Call(fn, node, e.concrete, inputs).eval()
    sub = _export(call, tuple(_example(e.tensor_of(a)) for a in inputs), [a in e.batch_dependent for a in inputs],
                  e.opset, node.name, _what(e, node))
    for a, graph_input in zip(inputs, sub.graph.input):
        e.nodes.append(helper.make_node("Identity", [e.arg(a)], [graph_input.name], name=graph_input.name))
    e.nodes.extend(sub.graph.node)
    for t in sub.graph.initializer:
        e.initializers[t.name] = t
    names = iter(Value(o.name) for o in sub.graph.output)
    return _rebuild(e.tensor_of(node), names)
