"""The graph walk: an int8 (or float) GraphModule -> an ONNX ModelProto, one FX node at a time, in order.

Values first: a ShapeRunner (fxquant.shapes) runs the example inputs (small tensors for real, the rest on
the meta device) and, with a dynamic batch, runs again at one more batch row to see which Python values
(x.shape[0]) follow the batch: those become ONNX shape ops, every other one a constant. Then each call
node goes to its converter (fxquant.onnx.converters); a node that reads no model input and no backend row
claims goes in as its value; a call fx kept whole (a leaf module, a torch.fx.wrap function) without a
converter is exported by torch.onnx and inlined (fxquant.onnx.leaf); any other op without a converter
raises an FxQuantError naming the node. Every ONNX node is named after the FX node it comes from.
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.meta import KEY, op_key
from fxquant.numerics import dequantize, quantize
from fxquant.onnx.converters import CONVERTERS
from fxquant.onnx.emitter import ONNX_DTYPES, Emitter, Value
from fxquant.onnx.leaf import inline_leaf
from fxquant.shapes import ShapeRunner, all_to_meta, on_meta, one_thread
from fxquant.traceable import is_wrapped


def _float_leaf(e, node):
    """A call fx did not trace into (a leaf module, a torch.fx.wrap function), exported by torch.onnx and inlined."""
    if node in e.needs_values:
        raise FxQuantError(
            f"export_onnx: node '{node.name}' ({node.format_node()}) reads tensor values (it cannot run on shapes alone), "
            "so an exported trace would freeze the branch the example took. Fix: write the branch with tensor ops "
            "(torch.where) so torch.fx traces it, or leave that module out of the model you export."
        )
    return inline_leaf(e, node)


class _Recorder(ShapeRunner):
    """A ShapeRunner that also tries each leaf call on the meta device first: a leaf that cannot run on
    shapes alone reads tensor values, and torch.onnx's trace of it would freeze the branch the example took."""

    def __init__(self, gm, leaves: set, *, real: bool = False):
        super().__init__(gm, real=real)
        self.leaves, self.needs_values = leaves, set()

    def run_node(self, n):
        if n in self.leaves:
            args, kwargs = all_to_meta(self.fetch_args_kwargs_from_env(n))
            try:
                if n.op == "call_module":
                    with on_meta(self.fetch_attr(n.target)) as module:
                        module(*args, **kwargs)
                else:
                    n.target(*args, **kwargs)
            except Exception:
                self.needs_values.add(n)
        return super().run_node(n)


def _batch_plus_one(t):
    """The input at one more batch row (the first row repeated), to see which values follow the batch."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return torch.cat([t, t[:1]]) if t.device.type != "meta" else t.new_empty((t.shape[0] + 1, *t.shape[1:]))


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value


@torch.no_grad()
def _record(gm: fx.GraphModule, example_inputs: tuple, dynamic_batch: bool, leaves: set):
    """(values at the example batch, nodes whose Python value changes with the batch, leaves that read values).

    A ShapeRunner walks the graph (small tensors for real, the rest on the meta device); when a node
    needs tensor values, the example inputs run for real. With `dynamic_batch` it walks it again at one
    more batch row, to see which Python values (sizes) follow the batch.
    """
    runs = [tuple(example_inputs)] + ([tuple(_batch_plus_one(t) for t in example_inputs)] if dynamic_batch else [])
    try:
        recorders = [_Recorder(gm, leaves) for _ in runs]
        with one_thread():  # its real calls are on small tensors
            for rec, inputs in zip(recorders, runs):
                rec.run(*inputs)
    except Exception:
        recorders = [_Recorder(gm, leaves, real=True) for _ in runs]
        for rec, inputs in zip(recorders, runs):
            try:
                rec.run(*inputs)
            except Exception as exc:
                again = " at one more batch row (export with dynamic_batch=False)" if rec is not recorders[0] else ""
                raise FxQuantError(f"export_onnx: the model fails on example_inputs{again}: {type(exc).__name__}: {exc}") from exc
    values, changed = recorders[0].values, set()
    if dynamic_batch:
        other = recorders[1].values
        changed = {n for n, v in values.items() if not isinstance(v, torch.Tensor) and _signature(v) != _signature(other.get(n))}
    return values, changed, set().union(*(r.needs_values for r in recorders))


def _depends_on_inputs(gm: fx.GraphModule) -> set:
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value)


def _is_leaf_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module call, or a function torch.fx.wrap kept whole (not a torch op, which must have a converter)."""
    return node.op == "call_module" or (node.op == "call_function" and is_wrapped(node.target))


def _foldable(node: fx.Node, constant: bool) -> bool:
    """A node that reads no model input and no backend row claims: its value goes in the file as a constant.
    Quantize/dequantize stay nodes, so weights stay integer initializers."""
    claimed = KEY in node.meta and node.meta[KEY].rule is not None
    return constant and node.target not in (quantize, dequantize) and not claimed


def _value_info(name: str, t: torch.Tensor, dynamic_batch: bool):
    shape = list(t.shape)
    if dynamic_batch and shape:
        shape[0] = "batch"
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], shape)


def to_onnx(gm: fx.GraphModule, example_inputs: tuple, *, opset: int = 17, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Build the ONNX model of an int8 (or float) GraphModule; no file is written.

    Shapes come from running the example inputs on the meta device; with `dynamic_batch`, a second
    run at one more batch row tells which Python values follow the batch (x.shape[0]): those become
    ONNX ops, every other one a constant. A node that reads no model input and no backend row claims
    goes in the file as its value.
    """
    leaves = {n for n in gm.graph.nodes if _is_leaf_call(gm, n) and CONVERTERS.get(op_key(gm, n)) is None}
    values, batch_values, needs_values = _record(gm, example_inputs, dynamic_batch, leaves)
    e = Emitter(gm, values)
    e.opset, e.needs_values, e.batch_values = opset, needs_values, batch_values
    from_inputs = _depends_on_inputs(gm)
    e.batch_dependent = from_inputs if dynamic_batch else set()
    real: dict = {}  # constant nodes' real values, computed when folded
    inputs, outputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            e.names[node] = Value(node.name)
            inputs.append(_value_info(node.name, values[node], dynamic_batch))
        elif node.op == "get_attr":
            value = values[node]
            e.names[node] = e.init(node.target, value) if isinstance(value, torch.Tensor) else value
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for i, r in enumerate(results):
                name = "output" if len(results) == 1 else f"output_{i}"
                e.nodes.append(helper.make_node("Identity", [e.arg(r)], [name], name=name))
                outputs.append(_value_info(name, values[r], dynamic_batch))
        else:
            e.names[node] = _convert(e, node, batch_values, node not in from_inputs, real)
    live = {o.name for o in outputs}  # nodes whose values nothing reads (a table dequantized by rows instead) go
    e.nodes = [n for n in reversed(e.nodes) if any(o in live for o in n.output) and not live.update(n.input)][::-1]
    used = {i for n in e.nodes for i in n.input}
    initializers = [t for name, t in e.initializers.items() if name in used]
    graph = helper.make_graph(e.nodes, type(gm).__name__, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fxquant")
    model.ir_version = min(model.ir_version, 10)
    return model


def _real_value(gm: fx.GraphModule, node: fx.Node, cache: dict):
    """The real value of a node that reads no model input (its inputs computed first, memoised in `cache`)."""
    if node not in cache:
        for a in node.all_input_nodes:
            _real_value(gm, a, cache)
        runner = fx.Interpreter(gm)
        runner.env = cache
        with torch.no_grad():
            cache[node] = runner.run_node(node)
    return cache[node]


def _convert(e: Emitter, node: fx.Node, batch_values: set, constant: bool, real: dict):
    """The Value (or Python constant) of one FX call node, emitting its ONNX nodes."""
    value = e.tensor_of(node)
    if not _holds_tensor(value) and node not in batch_values:
        return value  # a Python value the same at every batch (a size, a flag): a constant in the file
    if isinstance(value, torch.Tensor) and _foldable(node, constant):
        return e.init(node.name, _real_value(e.gm, node, real))
    convert = CONVERTERS.get(op_key(e.gm, node))
    if convert is None and _is_leaf_call(e.gm, node):
        convert = _float_leaf
    if convert is None:
        what = getattr(op_key(e.gm, node), "__name__", str(node.target))
        raise FxQuantError(f"export_onnx: node '{node.name}' ({node.op} {what}) has no ONNX converter yet")
    return convert(e, node)
