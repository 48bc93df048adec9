"""The graph walk: an int8 (or float) GraphModule -> an ONNX ModelProto, one FX node at a time, in order.

Values first: a ShapeRunner (fxquant.shapes) runs the example inputs (small tensors for real, the rest on
the meta device) and, with a dynamic batch, runs again at one more batch row to see which Python values
(x.shape[0]) follow the batch: those become ONNX shape ops, every other one a constant. Then each call
node goes to its converter (fxquant.onnx.converters); a node that reads no model input and no backend row
claims goes in as its value; a call fx kept whole (a leaf module, a torch.fx.wrap function) or any other
op without a converter (a float op: pow, where, group_norm...) is exported by torch.onnx and inlined
(fxquant.onnx.leaf); what torch.onnx refuses raises an FxQuantError naming the node. Every ONNX node is
named after the FX node it comes from.
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
        why = e.needs_values[node]
        raise FxQuantError(
            f"export_onnx: node '{node.name}' ({node.format_node()}) runs in float as one call (torch.fx could not trace "
            f"into it) and fails on shapes alone (the meta device): {why}. torch.onnx's trace of it would keep only "
            "what the example computed. If it branches on tensor values, write the branch with tensor ops (torch.where) "
            "so torch.fx traces it; if it mixes devices, keep its tensors as buffers (register_buffer) rather than "
            "plain attributes; or leave that module out of the model you export."
        )
    return inline_leaf(e, node)


class _Recorder(ShapeRunner):
    """A ShapeRunner that also tries each leaf call on the meta device first: a leaf that cannot run on
    shapes alone reads tensor values, and torch.onnx's trace of it would freeze the branch the example took."""

    def __init__(self, gm, leaves: set, *, real: bool = False):
        super().__init__(gm, real=real)
        self.leaves, self.needs_values = leaves, {}  # leaf node -> why it failed on the meta device

    def run_node(self, n):
        if n in self.leaves:
            args, kwargs = all_to_meta(self.fetch_args_kwargs_from_env(n))
            try:
                if n.op == "call_module":
                    with on_meta(self.fetch_attr(n.target)) as module:
                        module(*args, **kwargs)
                else:
                    n.target(*args, **kwargs)
            except Exception as exc:
                self.needs_values[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return super().run_node(n)


def _batch_plus_one(t):
    """The input at one more batch row (the first row repeated), to see which values follow the batch."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return torch.cat([t, t[:1]]) if t.device.type != "meta" else t.new_empty((t.shape[0] + 1, *t.shape[1:]))


def _signature(value):
    """A comparable stand-in of a (nested) value: tensors by shape and dtype, containers item by item."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value


@torch.no_grad()
def _record(gm: fx.GraphModule, example_inputs: tuple, dynamic_batch: bool, leaves: set):
    """(values at the example batch, nodes whose Python value changes with the batch, leaves that read values,
    values at one more batch row: the same values without `dynamic_batch`).

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
    other = recorders[-1].values
    if dynamic_batch:
        changed = {n for n, v in values.items() if not isinstance(v, torch.Tensor) and _signature(v) != _signature(other.get(n))}
    needs_values = {n: why for r in recorders for n, why in r.needs_values.items()}
    return values, changed, needs_values, other


def _depends_on_inputs(gm: fx.GraphModule) -> set:
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value)


def output_names(onnx_tree, concrete) -> list[tuple[str, object, torch.Tensor]]:
    """(ONNX output name, ONNX value, example tensor) for each tensor in the model's output pytree, in order:
    "output" for one tensor; a tuple's items "output_0", "output_1"; a dict's entries (a namedtuple's
    fields) by key ("out", "aux"); nested ones join the path with "." ("aux.0", "output_1.2"). None and
    other constants are not outputs. `onnx_tree` is the output as the emitter's Values, `concrete` as the
    example inputs computed it (the two have one structure)."""
    found = []

    def walk(value, example, path):
        if isinstance(example, torch.Tensor):
            found.append((path, value, example))
        elif isinstance(example, dict):
            for k in example:
                walk(value[k], example[k], path + (str(k),))
        elif isinstance(example, (list, tuple)):
            keys = getattr(example, "_fields", range(len(example)))  # a namedtuple's items by field
            for k, v, x in zip(keys, value, example):
                walk(v, x, path + (str(k),))

    walk(onnx_tree, concrete, ())
    if isinstance(concrete, torch.Tensor):
        return [("output", onnx_tree, concrete)]
    prefix = "output_" if isinstance(concrete, (list, tuple)) and not hasattr(concrete, "_fields") else ""
    return [(prefix + ".".join(path), value, t) for path, value, t in found]


def _claim_name(e: Emitter, name: str, value) -> str:
    """Make `name` free for a graph output: an ONNX value of the graph that already has it (a node named
    like an output key: a module `out` and the key "out") is renamed `<name>/value` where it is made and
    read, so the output keeps the key. Returns the (possibly renamed) `value`."""
    taken = {o for n in e.nodes for o in n.output} | set(e.initializers)
    if name not in taken:
        return value
    new = f"{name}/value"
    for n in e.nodes:
        n.input[:] = [new if i == name else i for i in n.input]
        n.output[:] = [new if o == name else o for o in n.output]
        if n.name == name:
            n.name = new
    if name in e.initializers:
        e.initializers[new] = e.initializers.pop(name)
        e.initializers[new].name = new
    return new if value == name else value


def _is_leaf_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A module call, or a function torch.fx.wrap kept whole (not a torch op, which must have a converter)."""
    return node.op == "call_module" or (node.op == "call_function" and is_wrapped(node.target))


def _foldable(node: fx.Node, constant: bool) -> bool:
    """A node that reads no model input and no backend row claims: its value goes in the file as a constant.
    Quantize/dequantize stay nodes, so weights stay integer initializers."""
    claimed = KEY in node.meta and node.meta[KEY].rule is not None
    return constant and node.target not in (quantize, dequantize) and not claimed


def _value_info(name: str, t: torch.Tensor, dynamic_batch: bool, plus_one: torch.Tensor | None = None):
    """A graph input's or output's type. With a dynamic batch, an input's first dimension is "batch"; an
    output's dimensions are read from the run at one more batch row (`plus_one`): one that grew by one is
    "batch", any other that changed (a flatten of the whole tensor) is named "<name>_dim<i>"."""
    shape = list(t.shape)
    if dynamic_batch and shape and plus_one is None:
        shape[0] = "batch"
    elif dynamic_batch and isinstance(plus_one, torch.Tensor) and plus_one.dim() == len(shape):
        shape = [d if d == d1 else "batch" if i == 0 and d1 == d + 1 else f"{name}_dim{i}"
                 for i, (d, d1) in enumerate(zip(shape, plus_one.shape))]
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], shape)


def to_onnx(gm: fx.GraphModule, example_inputs: tuple, *, opset: int = 17, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Build the ONNX model of an int8 (or float) GraphModule; no file is written.

    Shapes come from running the example inputs on the meta device; with `dynamic_batch`, a second
    run at one more batch row tells which Python values follow the batch (x.shape[0]): those become
    ONNX ops, every other one a constant. A node that reads no model input and no backend row claims
    goes in the file as its value.
    """
    leaves = {n for n in gm.graph.nodes if _is_leaf_call(gm, n) and CONVERTERS.get(op_key(gm, n)) is None}
    values, batch_values, needs_values, plus_one = _record(gm, example_inputs, dynamic_batch, leaves)
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
            concrete = fx.node.map_arg(node.args[0], lambda n: values[n])
            grown = [t for _, _, t in output_names(e.arg(node.args[0]), fx.node.map_arg(node.args[0], lambda n: plus_one[n]))]
            for (name, value, example), bigger in zip(output_names(e.arg(node.args[0]), concrete), grown):
                if name in {i.name for i in inputs}:
                    raise FxQuantError(f"export_onnx: output '{name}' has the name of a model input; rename the key")
                value = _claim_name(e, name, value)
                e.nodes.append(helper.make_node("Identity", [value], [name], name=name))
                outputs.append(_value_info(name, example, dynamic_batch, bigger))
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
        convert = _float_fallback
    return convert(e, node)


def _float_fallback(e: Emitter, node: fx.Node):
    """Any other op (pow, where, group_norm, a comparison...) no converter knows: no backend row claims it,
    so it runs in float between a DequantizeLinear and the next QuantizeLinear, and torch.onnx exports
    it as a leaf would be (fxquant.onnx.leaf), under the node's name. Whatever torch.onnx exports,
    fxquant's export does too; what it refuses raises an FxQuantError that names the node and the op."""
    return name_after(e, node, inline_leaf(e, node))


def name_after(e: Emitter, node: fx.Node, value):
    """A one-tensor result renamed to the FX node's name (an Identity), so layers line up by name."""
    if not isinstance(value, Value):
        return value
    return e.op(node, "Identity", [value])
