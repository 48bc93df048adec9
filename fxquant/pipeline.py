"""The pipeline is a list of passes; `run_passes` lints the graph after each and names the pass in errors."""

from __future__ import annotations

import contextlib
import functools
import gc
import time

from torch import fx

from fxquant.errors import FxQuantError


def pass_name(p) -> str:
    return p.func.__name__ if isinstance(p, functools.partial) else p.__name__


@contextlib.contextmanager
def paused_gc():
    """Passes make many small objects that live as long as the graph; the cyclic collector's full sweeps
    over them grew with graph size and made quantize() superlinear. Nothing here makes garbage cycles
    worth collecting mid-pipeline, so the collector waits until the passes are done."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_passes(model, passes, *, trace: list | None = None) -> fx.GraphModule:
    """Apply each pass in order. `trace`, when given, receives (pass name, seconds, graph text) per pass.

    The graph is linted after every pass and its Python code generated once, after the last: passes read
    and rewrite the graph, none runs the module's forward (trace_model runs its graph with an Interpreter).
    """
    with paused_gc():
        for p in passes:
            start = time.perf_counter()
            try:
                model = p(model)
                model.graph.lint()
            except FxQuantError:
                raise
            except Exception as exc:
                raise FxQuantError(f"pass {pass_name(p)} failed: {type(exc).__name__}: {exc}") from exc
            if trace is not None:
                trace.append((pass_name(p), time.perf_counter() - start, str(model.graph)))
        model.recompile()
    return model
