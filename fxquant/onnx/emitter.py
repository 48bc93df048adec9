"""The emitter: ONNX nodes and initializers accumulated while the FX graph is walked in order.

A converter (fxquant/onnx/<family>.py) gets the emitter and one FX node and returns the node's value:
a `Value` (the name of an ONNX tensor) or a Python constant (a size the same at every batch).

    e.arg(fx_arg)                 the Value / constant an FX argument stands for
    e.tensor_of(fx_node)          the tensor it held when the example inputs ran (shapes, dtypes, constants)
    e.op(node, "Conv", inputs)    one ONNX node; the last one a converter emits takes the FX node's name
    e.const(node, array, "w")     an initializer named "<node>/w"; e.int64(...) the same for int64 vectors
    e.shape_vector(node, dims)    an int64 shape from ints and Values that follow the batch
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn


ONNX_DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8,
    torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
}


class Value(str):
    """The name of an ONNX value (a tensor in the graph), as opposed to a Python constant."""


class Emitter:
    """Accumulates ONNX nodes and initializers while the FX graph is walked in order."""

    def __init__(self, gm: fx.GraphModule, values: dict):
        self.gm, self.concrete = gm, values  # concrete: fx node -> value from running example inputs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.names: dict[fx.Node, object] = {}  # fx node -> Value or a Python constant
        self.opset = 17  # the integer types Q/DQ may use depend on it
        self.needs_values: dict = {}  # leaves that could not run on shapes alone -> why
        self.batch_values: set = set()  # nodes whose Python value (a size) follows the batch
        self.batch_dependent: set = set()  # nodes computed from the model's inputs (dynamic batch only)

    def init(self, name: str, array) -> Value:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return Value(name)

    def const(self, node: fx.Node, array, suffix: str) -> Value:
        return self.init(f"{node.name}/{suffix}", array)

    def op(self, node: fx.Node, op_type: str, inputs, suffix: str = "", **attrs) -> Value:
        """Emit one ONNX node; the last one for an FX node takes that node's name as its output."""
        name = f"{node.name}/{suffix}" if suffix else node.name
        out = Value(name)
        inputs = ["" if i is None else i for i in inputs]
        while inputs and inputs[-1] == "":  # a trailing absent input (Conv without bias) is left out: ORT's fusions expect that
            inputs.pop()
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **{k: v for k, v in attrs.items() if v is not None}))
        return out

    def arg(self, a):
        """An FX argument as Value / Python constant (recursing into lists, tuples, dicts and slices)."""
        if isinstance(a, fx.Node):
            return self.names[a]
        if isinstance(a, slice):  # x[:, :n] with n = x.size(1) (HFTracer): a constant unless it follows the batch
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    def tensor_of(self, a) -> torch.Tensor:
        """The concrete tensor an argument held when the example inputs ran."""
        return self.concrete[a]

    def shape_vector(self, node: fx.Node, dims, *, reshape: bool = False) -> Value:
        """A 1-D int64 shape tensor from ints and scalar Values (from x.size(i)); `reshape`: -1 may stand for one."""
        if all(isinstance(d, int) for d in dims):
            return self.const(node, np.array(dims, dtype=np.int64), "shape")
        if reshape and sum(isinstance(d, Value) for d in dims) == 1 and -1 not in dims:  # Reshape infers the one that follows the batch
            return self.const(node, np.array([-1 if isinstance(d, Value) else d for d in dims], dtype=np.int64), "shape")
        parts = []
        for i, d in enumerate(dims):
            if isinstance(d, Value):
                parts.append(self.op(node, "Unsqueeze", [d, self.const(node, np.array([0], np.int64), f"axes{i}")], f"dim{i}"))
            else:
                parts.append(self.const(node, np.array([d], dtype=np.int64), f"dim{i}"))
        return self.op(node, "Concat", parts, "shape", axis=0)

    def whole_shape(self, node: fx.Node, a) -> Value:
        """A shape argument (x.size() that follows the batch, a tuple of ints and sizes) as a 1-D int64 Value."""
        value = self.arg(a)
        return value if isinstance(value, Value) else self.shape_vector(node, list(value))

    def outputs(self, node: fx.Node, op_type: str, inputs, n: int, **attrs) -> list[Value]:
        """Emit one ONNX node with `n` outputs, named `<node>/0` ... `<node>/<n-1>`."""
        outs = [Value(f"{node.name}/{i}") for i in range(n)]
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs, name=node.name, **attrs))
        return outs

    def int64(self, node: fx.Node, values, suffix: str) -> Value:
        return self.const(node, np.array(values, dtype=np.int64), suffix)

    def rank(self, a) -> int:
        return len(self.tensor_of(a).shape)

    def module(self, node: fx.Node) -> nn.Module:
        """The module a call_module node calls."""
        return self.gm.get_submodule(node.target)

    def param(self, node: fx.Node, p, what: str):
        """A weight/bias: an FX value, a float module parameter (a constant), or absent (None)."""
        if p is None:
            return None
        if isinstance(p, fx.Node):
            return self.arg(p)
        return self.const(node, p, what)


def pair(v, n=2):
    """An int or a sequence (a kernel size, a stride) as a list of `n`."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def call_arg(node: fx.Node, i: int, name: str, default=None):
    """Positional argument `i` or keyword `name` of an FX call."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
