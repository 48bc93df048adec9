"""trace_model: nn.Module -> GraphModule, with each node's shape from the example inputs.

before:  an ordinary nn.Module
after:   graph():
             %x     = placeholder[target=x]                      meta: shape (1, 3, 32, 32)
             %conv1 = call_module[target=conv1](args=(%x,))      meta: shape (1, 8, 32, 32)
             ...

Forward arguments past the example inputs take their defaults (forward(x, attn_mask=None) traced with x
alone is forward(x, None)). Modules named in `leaf_modules` or `exclude` (qualified names or types) are kept whole, as one
call_module node. A trace failure names the module and the source line that broke it; with
`auto_leaf=True` (what quantize() uses) that submodule is kept whole instead and tracing retried.
Each kept-whole call carries the reason in meta["fxquant"].leaf, for fxquant.report().
nn.MultiheadAttention and torchvision's Swin attention are traced through stand-ins (fxquant.traceable) so
their Linear layers quantize.
Shapes come from fxquant.shapes.ShapeRunner: small tensors run for real, big ones on the meta device
(shapes only, no arithmetic); code that reads tensor values makes the example inputs run for real.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Mapping

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.meta import info, matches_names
from fxquant.shapes import ShapeRunner, one_thread
from fxquant.stand_ins import with_stand_ins
from fxquant.traceable import FloatLeaf, is_wrapped


class _Tracer(fx.Tracer):
    def __init__(self, leaves=()):  # a default: unpickling a GraphModule re-creates its tracer with no arguments
        super().__init__()
        self.leaves = tuple(leaves)
        self.path: list[str] = []  # modules being traced; left as it was when tracing fails

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaf = matches_names(qualname, m, self.leaves) or isinstance(m, FloatLeaf)  # a stand-in's float bookkeeping
        return leaf or super().is_leaf_module(m, qualname)

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


def _broke_at(tracer: _Tracer, exc: BaseException) -> tuple[str, str]:
    """(qualified name of the innermost module being traced, or "" for the root; what broke and where)."""
    where = tracer.path[-1] if tracer.path else ""
    return where, f"{_user_frame(exc)}: {type(exc).__name__}: {exc}"


def _inputs_given(root: nn.Module, example_inputs, concrete_args) -> tuple[list[str], dict]:
    """(the forward parameters the example inputs give, in the forward's order; concrete_args with every other
    parameter that has a default fixed at it). A dict of keyword inputs gives its keys, a tuple the first ones."""
    params = [p for p in inspect.signature(root.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    fixed = dict(concrete_args or {})
    if isinstance(example_inputs, Mapping):
        unknown = [k for k in example_inputs if k not in [p.name for p in params]]
        if unknown:
            raise FxQuantError(f"example_inputs: {unknown} are not inputs of {type(root).__name__}.forward; it takes "
                               f"{[p.name for p in params]}")
        given = [p.name for p in params if p.name in example_inputs]
    else:
        given = [p.name for p in params if p.name not in fixed][:len(example_inputs)]
    fixed.update({p.name: p.default for p in params if p.name not in given and p.name not in fixed and p.default is not p.empty})
    return given, fixed or None


def _trace(model: nn.Module, leaves, concrete_args, *, auto_leaf: bool = False, example_inputs=()):
    """Trace `model`; with `auto_leaf`, a submodule that breaks tracing is kept whole and tracing retried.

    Returns the GraphModule, {leaf qualname: why it was kept whole} for the modules made leaves here, the
    module traced (the model or its stand-in) and the concrete arguments used.
    """
    broken: dict[str, str] = {}
    while True:
        root = with_stand_ins(model, keep=tuple(leaves) + tuple(broken))
        _, fixed = _inputs_given(root, example_inputs, concrete_args)
        tracer = _Tracer(tuple(leaves) + tuple(broken))
        try:
            graph = tracer.trace(root, concrete_args=fixed)
            return fx.GraphModule(tracer.root, graph, type(model).__name__), broken, root, fixed
        except Exception as exc:
            where, why = _broke_at(tracer, exc)
            if auto_leaf and where and where not in broken:
                kind = type(root.get_submodule(where)).__name__
                broken[where] = (f"torch.fx cannot trace it at {why} (kept whole, float; to quantize inside it: "
                                 f"fxquant.register_stand_in({kind}, make))")
                continue
            kind = type(root.get_submodule(where)).__name__ if where else type(root).__name__
            module = f"module '{where}' ({kind})" if where else "the model's own forward"
            fix = f"exclude=['{where}'] (keeps it in float) or leaf_modules=['{where}']" if where else (
                "concrete_args= for an argument the branch reads, or move the branch into a submodule (which can be kept whole)"
            )
            fix += (f", or give {kind} a traceable stand-in: fxquant.register_stand_in({kind}, make) where make(module) "
                    "returns an nn.Module computing the same in traceable ops (see fxquant.hf for examples)")
            raise FxQuantError(f"torch.fx cannot trace {module} at {why}. Fix: pass {fix}.") from exc


class _ShapeRecorder(ShapeRunner):
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


@torch.no_grad()
def record_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Each node's shape and dtype into its meta, from a ShapeRunner; when a node needs tensor values
    (data-dependent code) the inputs run for real, and a failure there names the node."""
    was_training = gm.training
    gm.eval()  # recording shapes must not move BatchNorm statistics
    # nor may a functional batch norm traced in training mode (F.batch_norm(..., self.training, ...) of a QAT
    # model: the flag is a constant True in the graph), which updates its running statistics in place
    saved = [(b, b.clone()) for b in gm.buffers()]
    try:
        with one_thread():  # its real calls are on small tensors
            _ShapeRecorder(gm).run(*example_inputs)
    except Exception:
        _ShapeRecorder(gm, real=True).run(*example_inputs)
    finally:
        gm.train(was_training)
        for buffer, value in saved:
            buffer.copy_(value)


def _bind_concrete_args(gm: fx.GraphModule, model: nn.Module, concrete_args) -> None:
    """fx keeps a placeholder per concrete argument; read its value from `concrete_args` instead."""
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.target.startswith("*")]
    if not concrete_args or len(names) != len(placeholders):
        return
    for name, node in zip(names, placeholders):
        if name in concrete_args:
            value = concrete_args[name]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
            gm.graph.erase_node(node)


def _mark_leaves(gm: fx.GraphModule, leaf_modules, exclude, broken: dict) -> None:
    for node in gm.graph.nodes:
        why = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if node.target in broken:
                why = broken[node.target]
            elif matches_names(node.target, module, exclude):
                why = "exclude=: kept whole, in float, as asked"
            elif matches_names(node.target, module, leaf_modules):
                why = "leaf_modules=: kept whole as asked"
            elif type(module) is nn.MultiheadAttention:
                why = "nn.MultiheadAttention in a form fxquant does not decompose (bias_k, add_zero_attn)"
        elif node.op == "call_function" and is_wrapped(node.target):
            why = f"torch.fx.wrap: fx calls {getattr(node.target, '__qualname__', node.target)} whole"
        info(node).leaf = why


def _with_defaults(model: nn.Module, n_given: int, concrete_args) -> dict | None:
    """`concrete_args` plus the default of every forward argument past the `n_given` example inputs (and of
    every keyword-only one): forward(x, attn_mask=None, is_causal=False) called with x alone traces as
    forward(x, None, False), the call the user makes."""
    concrete = dict(concrete_args or {})
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.name not in concrete]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return concrete_args
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = positional[n_given:] + [p for p in params if p.kind is p.KEYWORD_ONLY]
    concrete.update({p.name: p.default for p in rest if p.default is not p.empty})
    return concrete or concrete_args


def check_module_names(model: nn.Module, option: str, items) -> None:
    """Each str in `items` (exclude= / leaf_modules=) is the qualified name of a module of `model`: a misspelt name
    would otherwise match nothing and be ignored without a word."""
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = [n for n in items if isinstance(n, str) and n not in names]
    if unknown:
        shown = sorted(n for n in names if n)
        raise FxQuantError(f"{option}={unknown}: no module of {type(model).__name__} has that name (misspelt?); its "
                           f"modules: {', '.join(shown[:30])}{' ...' if len(shown) > 30 else ''}")


def trace_model(model: nn.Module, *, example_inputs: tuple, leaf_modules=(), exclude=(), concrete_args=None,
                auto_leaf: bool = False) -> fx.GraphModule:
    leaf_modules, exclude = tuple(leaf_modules), tuple(exclude)
    check_module_names(model, "leaf_modules", leaf_modules)
    if isinstance(model, fx.GraphModule):  # from any tracer (HFTracer, the user's own): taken as it is
        gm, broken = model, {}
    else:
        gm, broken, root, fixed = _trace(model, leaf_modules + exclude, concrete_args, auto_leaf=auto_leaf,
                                         example_inputs=example_inputs)
        _bind_concrete_args(gm, root, fixed)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(example_inputs, Mapping):
        missing = [n.target for n in placeholders if n.target not in example_inputs]
        if missing:
            raise FxQuantError(f"example_inputs: the model's graph reads inputs {missing} the dict does not give")
        example_inputs = tuple(example_inputs[n.target] for n in placeholders)
    if len(placeholders) != len(example_inputs):
        names = [n.target for n in placeholders]
        raise FxQuantError(f"example_inputs: the model takes {len(names)} inputs {names}, got {len(example_inputs)}")
    record_shapes(gm, example_inputs)
    _mark_leaves(gm, leaf_modules, exclude, broken)
    return gm
