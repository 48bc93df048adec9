"""The public API: quantize -> (calibrate | train) -> convert -> export_onnx."""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import fx, nn

from fxquant.backends import load_backend
from fxquant.errors import FxQuantError
from fxquant.nn import FakeQuantize
from fxquant.passes import annotate_quant, fuse_modules, insert_fake_quant, lower_to_int8, trace_model
from fxquant.pipeline import run_passes
from fxquant.specs import check_bits


def _as_inputs(example_inputs, name="example_inputs") -> tuple:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise FxQuantError(f"{name}: expected a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(inputs)


def prepare_passes(*, example_inputs, backend, w_bits=8, a_bits=8, exclude=(), leaf_modules=(), concrete_args=None):
    """The prepare pipeline, as a list you can read (and pass to `run_passes` yourself)."""
    return [
        partial(trace_model, example_inputs=example_inputs, leaf_modules=leaf_modules, exclude=exclude, concrete_args=concrete_args),
        fuse_modules,
        partial(annotate_quant, backend=backend, w_bits=w_bits, a_bits=a_bits, exclude=exclude),
        insert_fake_quant,
    ]


def quantize(
    model: nn.Module,
    example_inputs,
    *,
    backend: str = "onnxruntime",
    qat: bool = False,
    calib_data=None,
    w_bits: int = 8,
    a_bits: int = 8,
    exclude=(),
    leaf_modules=(),
    concrete_args=None,
    progress: bool = True,
    pass_trace: list | None = None,
) -> fx.GraphModule:
    """Trace, fuse, annotate by `backend`'s rules and insert fake-quant; calibrate on `calib_data`.

    The user's model is not modified. `exclude` names modules (qualified names or types) or
    functions to keep in float. With `qat=True` the result is in train mode with observers on.
    """
    if not isinstance(model, nn.Module):
        raise FxQuantError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    rules = load_backend(backend)
    if isinstance(exclude, (str, type)) or not isinstance(exclude, (tuple, list, set)):
        raise FxQuantError(f"exclude={exclude!r}: expected a list of module names, module types or functions")
    inputs = _as_inputs(example_inputs)
    model = copy.deepcopy(model).train(qat)
    passes = prepare_passes(
        example_inputs=inputs, backend=rules, w_bits=w_bits, a_bits=a_bits,
        exclude=tuple(exclude), leaf_modules=tuple(leaf_modules), concrete_args=concrete_args,
    )
    qmodel = run_passes(model, passes, trace=pass_trace)
    if calib_data is not None:
        calibrate(qmodel, calib_data, n_inputs=len(inputs), progress=progress)
    if qat:
        set_fake_quant(qmodel, observe=True, enabled=True)
        qmodel.train()
    return qmodel


def fake_quants(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def set_fake_quant(model: nn.Module, *, observe: bool | None = None, enabled: bool | None = None) -> None:
    """Turn observing and fake-quantizing on or off for every FakeQuantize in the model."""
    for fq in fake_quants(model):
        if observe is not None:
            fq.observe = observe
        if enabled is not None:
            fq.enabled = enabled


def _batch_inputs(batch, n_inputs: int, index: int) -> tuple:
    inputs = _as_inputs(batch, name=f"calib_data batch {index}")[:n_inputs]
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise FxQuantError(f"calib_data batch {index} contains NaN or Inf; calibration needs finite inputs")
    return inputs


@torch.no_grad()
def calibrate(qmodel: fx.GraphModule, calib_data, *, n_inputs: int | None = None, progress: bool = True) -> fx.GraphModule:
    """PTQ: observe `calib_data` with fake-quant off, then freeze the ranges and turn fake-quant on.

    Each batch is a tensor or a tuple whose first `n_inputs` items are the model's inputs, so a
    DataLoader yielding (x, y) works as it is.
    """
    from tqdm.auto import tqdm

    n_inputs = n_inputs or sum(n.op == "placeholder" for n in qmodel.graph.nodes)
    was_training = qmodel.training
    qmodel.eval()
    set_fake_quant(qmodel, observe=True, enabled=False)
    seen = 0
    total = len(calib_data) if hasattr(calib_data, "__len__") else None
    for i, batch in enumerate(tqdm(calib_data, desc="calibrate", total=total, disable=not progress, leave=False)):
        qmodel(*_batch_inputs(batch, n_inputs, i))
        seen += 1
    if seen == 0:
        raise FxQuantError("calib_data is empty: pass an iterable of at least one input batch")
    missed = [name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantize) and not m.calibrated]
    if missed:
        raise FxQuantError(f"calib_data never reached fake-quant nodes {missed}: feed inputs that exercise every branch")
    set_fake_quant(qmodel, observe=False, enabled=True)
    qmodel.train(was_training)
    return qmodel


def convert(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The reference int8 GraphModule: int8 weights, int32 bias, Q/DQ between ops (ONNX semantics)."""
    if not isinstance(qmodel, fx.GraphModule) or not fake_quants(qmodel):
        raise FxQuantError("convert: expected the fake-quant GraphModule returned by fxquant.quantize()")
    int8 = copy.deepcopy(qmodel).eval()
    return run_passes(int8, [lower_to_int8])
