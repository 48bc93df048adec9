"""Shapes without the arithmetic: a graph interpreter that runs small calls for real and the rest on the meta device.

trace_model records every node's shape with it (passes/trace_model.py) and export_onnx its values
(fxquant/onnx/walk.py). A call whose tensors are all real and small runs for real (microseconds); any
other runs on PyTorch's meta device, where an op computes its output's shape and dtype only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn


SMALL = 2**16  # elements: a real kernel on a tensor this small beats the meta device's Python shape functions
# modules whose output has their input's shape and dtype: on the meta device, no need to call them
SAME_SHAPE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity, nn.GELU,
              nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LayerNorm)


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _tensors(args) -> list[torch.Tensor]:
    found = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, torch.Tensor) else None)
    return found


def all_to_meta(args):
    return fx.node.map_aggregate(args, _to_meta)


@contextlib.contextmanager
def on_meta(module: nn.Module):
    """`module` with its parameters, buffers and plain tensor attributes (a detection head's cached anchor
    grid, `self.grid = ...`) swapped for meta tensors until the block ends; the attributes are then put
    back as they were, so a forward that re-caches one on the meta device leaves the module unchanged."""
    saved = [(m, m._parameters, m._buffers, dict(m.__dict__)) for m in module.modules()]
    try:
        for m, params, buffers, attrs in saved:
            m._parameters = {k: _to_meta(v) for k, v in params.items()}
            m._buffers = {k: _to_meta(v) for k, v in buffers.items()}
            m.__dict__.update({k: _to_meta(v) for k, v in attrs.items() if isinstance(v, torch.Tensor)})
        yield module
    finally:
        for m, params, buffers, attrs in saved:
            for k in [k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor) and k not in attrs]:
                del m.__dict__[k]  # a tensor attribute the meta call created
            m.__dict__.update({k: v for k, v in attrs.items() if isinstance(v, torch.Tensor)})
            m._parameters, m._buffers = params, buffers


class ShapeRunner(fx.Interpreter):
    """Runs a graph to learn its values' shapes, cheaply, keeping every node's value in `values`.

    A call whose tensor arguments are all real and small runs for real (microseconds); any other call
    runs on the meta device, where ops compute shapes only (a 224x224 ResNet-50 in milliseconds). With
    `real=True` every call runs for real: code that reads tensor values needs that.
    """

    def __init__(self, gm: fx.GraphModule, *, real: bool = False):
        super().__init__(gm)
        self.real, self.values = real, {}

    def run_node(self, n: fx.Node):
        self.values[n] = value = super().run_node(n)
        return value

    def _meta(self, args, kwargs) -> bool:
        return not self.real and any(t.device.type == "meta" or t.numel() > SMALL for t in _tensors((args, kwargs)))

    def call_function(self, target, args, kwargs):
        if self._meta(args, kwargs):
            args, kwargs = all_to_meta((args, kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if self._meta(args, kwargs):
            args, kwargs = all_to_meta((args, kwargs))
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        if not self._meta(args, kwargs):
            return super().call_module(target, args, kwargs)
        args, kwargs = all_to_meta((args, kwargs))
        module = self.fetch_attr(target)
        if type(module) in SAME_SHAPE and len(args) == 1 and not kwargs:
            return args[0]
        with on_meta(module) as module:
            return module(*args, **kwargs)


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the block: on small tensors, waking a thread pool costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
