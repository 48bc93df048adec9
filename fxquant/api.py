"""The public API: quantize -> (calibrate | train) -> convert -> export_onnx."""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import fx, nn

from fxquant.backends import BACKEND_META, load_backend
from fxquant.errors import FxQuantError
from fxquant.nn import FakeQuantize
from fxquant.passes import annotate_quant, decompose_ops, fuse_modules, insert_fake_quant, lower_to_int8, trace_model
from fxquant.pipeline import paused_gc, run_passes
from fxquant.specs import FAKE_QUANTS, OBSERVERS, check_bits


def copy_model(model: nn.Module) -> nn.Module:
    """A copy whose modules, parameters and buffers are new objects (what passes and training change);
    other attributes are shallow copies. copy.deepcopy does the same work through pickle's protocol,
    ~10x slower per module: seconds on a model with thousands of modules. A class with its own
    __deepcopy__ (a GraphModule) or a Parameter subclass is deep-copied."""
    memo: dict[int, object] = {}

    def tensor(t):
        if id(t) not in memo:
            plain = type(t) in (torch.Tensor, nn.Parameter)
            memo[id(t)] = copy.deepcopy(t) if not plain else (
                nn.Parameter(t.detach().clone(), t.requires_grad) if type(t) is nn.Parameter else t.detach().clone())
        return memo[id(t)]

    def module(m):
        if id(m) not in memo:
            if hasattr(type(m), "__deepcopy__"):
                memo[id(m)] = copy.deepcopy(m)
                return memo[id(m)]
            new = memo[id(m)] = type(m).__new__(type(m))
            new.__dict__.update({k: v.copy() if isinstance(v, (dict, list, set)) else v for k, v in m.__dict__.items()})
            new.__dict__["_parameters"] = {k: None if v is None else tensor(v) for k, v in m._parameters.items()}
            new.__dict__["_buffers"] = {k: None if v is None else tensor(v) for k, v in m._buffers.items()}
            new.__dict__["_modules"] = {k: None if v is None else module(v) for k, v in m._modules.items()}
        return memo[id(m)]

    with paused_gc():  # a copy makes thousands of objects: see paused_gc
        return module(model)


def _as_inputs(example_inputs, name="example_inputs") -> tuple:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise FxQuantError(f"{name}: expected a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(inputs)


def _check_choice(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise FxQuantError(f"{name}={value!r}: expected None (the backend's) or one of {allowed}")


def prepare_passes(*, example_inputs, backend, w_bits=8, a_bits=8, exclude=(), leaf_modules=(), concrete_args=None,
                   qat=False, fake_quant=None, observer=None, layer_bits=None):
    """The prepare pipeline, as a list you can read (and pass to `run_passes` yourself)."""
    return [
        partial(trace_model, example_inputs=example_inputs, leaf_modules=leaf_modules, exclude=exclude, concrete_args=concrete_args,
                auto_leaf=True),
        partial(fuse_modules, qat=qat),
        partial(decompose_ops, exclude=exclude),
        partial(annotate_quant, backend=backend, w_bits=w_bits, a_bits=a_bits, exclude=exclude,
                fake_quant=fake_quant, observer=observer, layer_bits=layer_bits),
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
    reduce_range: bool = False,
    target: str | None = None,
    fake_quant: str | None = None,
    observer: str | None = None,
    layer_bits: dict | None = None,
    exclude=(),
    leaf_modules=(),
    concrete_args=None,
    progress: bool = True,
    pass_trace: list | None = None,
) -> fx.GraphModule:
    """Trace, fuse, annotate by `backend`'s rules and insert fake-quant; calibrate on `calib_data`.

    The user's model is not modified. `exclude` names modules (qualified names or types) or
    functions to keep in float. With `qat=True` the result is in train mode with observers on.
    `reduce_range=True` narrows the weights to the backend's REDUCED_WEIGHT_BITS (7 on onnxruntime,
    depthwise convs included). `target` names where the file will run (the backend's TARGETS; None: its
    first). onnxruntime's "portable" (the default) is exact on every x86 CPU and ARM: the weights of the
    integer GEMMs (conv but depthwise, linear) are 7-bit, so the u8 x s8 pair sums of CPUs without VNNI
    cannot saturate; "vnni" keeps 8-bit weights for CPUs with AVX-VNNI / AVX512-VNNI or ARM dot product
    (see fxquant.backends.onnxruntime). The backend and its target are recorded in
    `qmodel.meta["fxquant_backend"]`, where export_onnx finds them to check the file and to stamp it.

    QAT (see fxquant.qat): qat=True keeps each conv's (and linear's) BatchNorm training, folded into the
    fake-quantized weight (fxquant.nn.ConvBnAct2d / LinearBnAct; fxquant.freeze_bn stops its statistics).
    `fake_quant` picks the kind for every fake-quant: "ste" (observer ranges, straight-through gradient),
    "lsq" (learned scales) or "lsq+" (learned scale and zero point on asymmetric activations, lsq on
    weights); None keeps the backend's. `observer` ("minmax", "moving_average", "current", "percentile",
    "mse") sets the activations' observer, and the weights' when it is "current", "percentile" or "mse"
    (weights are observed afresh each step: per-channel mse costs about 25 passes over the weight when it
    observes).
    `layer_bits` maps module names (or a parent's) to (w_bits, a_bits): that layer's weight, the
    activations it reads, and its output if nothing quantized reads it, e.g. {"fc": (8, 8)}.
    """
    if not isinstance(model, nn.Module):
        raise FxQuantError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    _check_choice("fake_quant", fake_quant, FAKE_QUANTS)
    _check_choice("observer", observer, OBSERVERS)
    rules = load_backend(backend, reduce_range=reduce_range, target=target)
    if isinstance(exclude, (str, type)) or not isinstance(exclude, (tuple, list, set)):
        raise FxQuantError(f"exclude={exclude!r}: expected a list of module names, module types or functions")
    inputs = _as_inputs(example_inputs)
    model = copy_model(model).train(qat)
    passes = prepare_passes(
        example_inputs=inputs, backend=rules, w_bits=w_bits, a_bits=a_bits,
        exclude=tuple(exclude), leaf_modules=tuple(leaf_modules), concrete_args=concrete_args,
        qat=qat, fake_quant=fake_quant, observer=observer, layer_bits=layer_bits,
    )
    qmodel = run_passes(model, passes, trace=pass_trace)
    qmodel.meta[BACKEND_META] = rules
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
def calibrate(qmodel: fx.GraphModule, calib_data, *, n_inputs: int | None = None, progress: bool = True,
              bias_correction: bool = False) -> fx.GraphModule:
    """PTQ: observe `calib_data` with fake-quant off, then freeze the ranges and turn fake-quant on.

    Each batch is a tensor or a tuple whose first `n_inputs` items are the model's inputs, so a
    DataLoader yielding (x, y) works as it is. `bias_correction=True` then shifts each layer's bias so
    its mean output per channel on `calib_data` is the float model's (fxquant.bias_correction; it reads
    `calib_data` once more per layer, so pass a list or a DataLoader).
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
    if bias_correction:
        from fxquant.bias_correction import correct_bias

        correct_bias(qmodel, calib_data, n_inputs=n_inputs, progress=progress)
    qmodel.train(was_training)
    return qmodel


def convert(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The reference int8 GraphModule: int8 weights, int32 bias, Q/DQ between ops (ONNX semantics)."""
    if not isinstance(qmodel, fx.GraphModule) or not fake_quants(qmodel):
        raise FxQuantError("convert: expected the fake-quant GraphModule returned by fxquant.quantize()")
    int8 = copy.deepcopy(qmodel).eval()
    return run_passes(int8, [lower_to_int8])
