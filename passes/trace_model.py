"""trace_model: nn.Module -> GraphModule, with each node's shape from the example inputs.

before:  an ordinary nn.Module
after:   graph():
             %x     = placeholder[target=x]                      meta: shape (1, 3, 32, 32)
             %conv1 = call_module[target=conv1](args=(%x,))      meta: shape (1, 8, 32, 32)
             ...

Modules named in `leaf_modules` or `exclude` (qualified names or types) are kept whole, as one
call_module node. A trace failure names the module and the source line that broke it.
"""

from __future__ import annotations

import traceback

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.meta import info, matches_names


class _Tracer(fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self.leaves = tuple(leaves)
        self.path: list[str] = []  # modules being traced; left as it was when tracing fails

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return matches_names(qualname, m, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return out


def _user_frame(exc: BaseException) -> str:
    """The last traceback frame outside torch: where the user's code broke tracing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "<unknown line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def _trace(model: nn.Module, leaves, concrete_args) -> fx.GraphModule:
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        where = tracer.path[-1] if tracer.path else ""
        module = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else "the model's own forward"
        fix = f"exclude=['{where}'] (keeps it in float) or leaf_modules=['{where}']" if where else "concrete_args= or exclude="
        raise FxQuantError(
            f"torch.fx cannot trace {module} at {_user_frame(exc)}: {type(exc).__name__}: {exc}. Fix: pass {fix}."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        try:
            value = super().run_node(n)
        except FxQuantError:
            raise
        except Exception as exc:
            raise FxQuantError(f"example_inputs: node '{n.name}' ({n.format_node()}) failed on them: {exc}") from exc
        if isinstance(value, torch.Tensor):
            info(n).shape, info(n).dtype = tuple(value.shape), value.dtype
        else:
            info(n)  # every traced node carries fxquant's meta, tensor or not
        return value


def trace_model(model: nn.Module, *, example_inputs: tuple, leaf_modules=(), exclude=(), concrete_args=None) -> fx.GraphModule:
    gm = _trace(model, tuple(leaf_modules) + tuple(exclude), concrete_args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        names = [n.target for n in placeholders]
        raise FxQuantError(f"example_inputs: the model takes {len(names)} inputs {names}, got {len(example_inputs)}")
    was_training = gm.training
    gm.eval()  # recording shapes must not move BatchNorm statistics
    with torch.no_grad():
        _ShapeRecorder(gm).run(*example_inputs)
    gm.train(was_training)
    return gm
