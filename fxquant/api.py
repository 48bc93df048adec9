"""The public API: quantize -> (calibrate | train) -> convert -> export_onnx."""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import fx, nn

from fxquant.backends import BACKEND_META, SENTINEL, SENTINEL_GAP
from fxquant.config import CONFIG_META, QuantConfig
from fxquant.errors import FxQuantError
from fxquant.inputs import EXAMPLE_META, NOT_GIVEN, as_inputs, batch_inputs, by_name, first_batch, forward_arity, one_row
from fxquant.nn import FakeQuantize, fake_quants, set_fake_quant
from fxquant.passes import (annotate_quant, decompose_ops, fuse_modules, insert_fake_quant, lift_functional, lower_to_int8,
                            smooth_activations, trace_model)
from fxquant.pending import PendingQuantization, not_run_yet
from fxquant.pipeline import paused_gc, run_passes


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


def prepare_passes(config: QuantConfig | None = None, *, example_inputs, calib_data=None, **overrides) -> list:
    """The prepare pipeline for `config` (keywords override its fields), as a list you can read and pass to
    `fxquant.pipeline.run_passes` yourself. `calib_data` is read by smooth_activations (config.smooth)."""
    config = (config or QuantConfig()).replace(**overrides)
    smooth = []
    if config.smooth is not None:
        if calib_data is None:
            raise FxQuantError(f"smooth={config.smooth}: SmoothQuant measures activations; pass calib_data= (a list "
                               "or a DataLoader: it is read once more to calibrate)")
        smooth = [partial(smooth_activations, calib_data=calib_data, alpha=config.smooth, exclude=config.exclude)]
    return [
        partial(trace_model, example_inputs=example_inputs, leaf_modules=config.leaf_modules, exclude=config.exclude,
                concrete_args=config.as_kwargs()["concrete_args"], auto_leaf=True),
        lift_functional,
        *smooth,
        partial(fuse_modules, qat=config.qat),
        partial(decompose_ops, exclude=config.exclude),
        partial(annotate_quant, backend=config.backend_table(), w_bits=config.w_bits, a_bits=config.a_bits,
                exclude=config.exclude, fake_quant=config.fake_quant, observer=config.observer,
                layer_bits=config.as_kwargs()["layer_bits"]),
        insert_fake_quant,
    ]


def quantize(model: nn.Module, example_inputs=NOT_GIVEN, config: QuantConfig | None = None, *, calib_data=None,
             progress: bool = True, pass_trace: list | None = None, **overrides) -> fx.GraphModule:
    """Trace, fuse, annotate by the backend's rules and insert fake-quant; calibrate on `calib_data`.

    `example_inputs` (a tensor or a tuple: the model's positional inputs) is only read for shapes. Left
    out, they are `calib_data`'s first batch (a DataLoader's (x, y) gives x: as many items as the model's
    forward takes), and with no data at all the passes that need shapes run at the first call of the
    returned model or fxquant.calibrate(qmodel, data), once (fxquant.pending): the same model, bit for
    bit, as quantize(model, those_inputs).

    The options are one fxquant.QuantConfig (`config`), each field of which may also be given, or
    overridden, as a keyword: quantize(model, x, w_bits=4) is quantize(model, x, QuantConfig(w_bits=4)).
    The config is recorded in `qmodel.meta["fxquant_config"]` and in the exported ONNX file.

    The user's model is not modified. `exclude` names modules (qualified names or types) or
    functions to keep in float. With `qat=True` the result is in train mode with observers on.
    `reduce_range=True` narrows the weights to the backend's REDUCED_WEIGHT_BITS (7 on onnxruntime,
    depthwise convs included). `target` names where the file will run (the backend's TARGETS; None: its
    first). onnxruntime's "portable" (the default) is exact on every x86 CPU and ARM: the weights of the
    integer GEMMs (conv but depthwise, linear) are 7-bit, so the u8 x s8 pair sums of CPUs without VNNI
    cannot saturate; "vnni" keeps 8-bit weights for CPUs with AVX-VNNI / AVX512-VNNI, or Arm
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
    `gptq=True` makes calibration round the weights with GPTQ (fxquant.gptq: Frantar et al. 2023), layer by
    layer for the output error on `calib_data`, on the calibrated scales: what wins back the portable target's
    7-bit weights. It reads `calib_data` once more per layer (a list or a DataLoader, not a generator).
    """
    if not isinstance(model, nn.Module):
        raise FxQuantError(f"model: expected an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, QuantConfig):
        raise FxQuantError(f"config: expected an fxquant.QuantConfig, got {type(config).__name__}; "
                           "pass options as keywords (w_bits=4) or as config=fxquant.QuantConfig(w_bits=4)")
    config = (config or QuantConfig()).replace(**overrides)
    config.backend_table()  # a table that does not load fails here, not at the first call
    if example_inputs is NOT_GIVEN and calib_data is None:
        build, n_inputs = partial(_prepared, config, pass_trace), forward_arity(model, dict(config.concrete_args or ()))
        return PendingQuantization(copy_model(model).train(config.qat), build, n_inputs, config.qat)
    if example_inputs is NOT_GIVEN:
        inputs, calib_data = first_batch(calib_data, forward_arity(model, dict(config.concrete_args or ())))
        recorded = one_row(inputs)  # what export_onnx uses when it is given none: one row of the first batch
    else:
        inputs = recorded = as_inputs(example_inputs)
    model = copy_model(model).train(config.qat)
    return _prepared(config, pass_trace, model, inputs, calib_data=calib_data, progress=progress, recorded=recorded)


def _prepared(config: QuantConfig, pass_trace, model: nn.Module, example_inputs: tuple, *, calib_data=None,
              progress: bool = True, recorded=None) -> fx.GraphModule:
    """quantize() once the example inputs are known: the passes, the model's meta, calibration, QAT's flags."""
    qmodel = run_passes(model, prepare_passes(config, example_inputs=example_inputs, calib_data=calib_data), trace=pass_trace)
    if not fake_quants(qmodel):
        raise nothing_to_quantize(qmodel)
    for name, fq in qmodel.named_modules():  # an observer that sees NaN names its fake-quant (a plain attribute)
        if isinstance(fq, FakeQuantize):
            fq.observer.__dict__["label"] = name
    names = input_names(qmodel)  # keyword inputs (a dict) in the order of the graph's inputs from here on
    example_inputs = by_name(example_inputs, names)
    qmodel.meta[BACKEND_META] = config.backend_table()
    qmodel.meta[CONFIG_META] = config
    qmodel.meta[EXAMPLE_META] = example_inputs if recorded is None else by_name(recorded, names)
    if calib_data is not None:
        calibrate(qmodel, calib_data, n_inputs=len(example_inputs), progress=progress)
    if config.qat:
        set_fake_quant(qmodel, observe=True, enabled=True)
        qmodel.train()
    return qmodel


@torch.no_grad()
def calibrate(qmodel: fx.GraphModule, calib_data, *, n_inputs: int | None = None, progress: bool = True,
              bias_correction: bool = False, gptq: bool | None = None) -> fx.GraphModule:
    """PTQ: observe `calib_data` with fake-quant off, then freeze the ranges and turn fake-quant on.

    Each batch is a tensor or a tuple whose first `n_inputs` items are the model's inputs, so a
    DataLoader yielding (x, y) works as it is. `bias_correction=True` then shifts each layer's bias so
    its mean output per channel on `calib_data` is the float model's (fxquant.bias_correction; it reads
    `calib_data` once more per layer, so pass a list or a DataLoader). `gptq=True` (None: the model's
    QuantConfig.gptq) first rounds each layer's weight with GPTQ on `calib_data` (fxquant.gptq: Frantar et al.
    2023; the scales stay as calibrated, so a portable file stays pair-sum safe; it reads `calib_data` once
    more per layer).
    A model from quantize(model) that has not run yet is built first, its shapes from the first batch.
    """
    from tqdm.auto import tqdm

    if isinstance(qmodel, PendingQuantization):  # quantize(model) with no inputs: the first batch gives them
        inputs, calib_data = first_batch(calib_data, n_inputs or qmodel.n_inputs)
        qmodel.materialize(inputs, recorded=one_row(inputs))
    if not isinstance(qmodel, fx.GraphModule) or not fake_quants(qmodel):
        raise FxQuantError(f"calibrate: expected the fake-quant GraphModule returned by fxquant.quantize(), got "
                           f"{type(qmodel).__name__}")
    if gptq is None:
        gptq = getattr(qmodel.meta.get(CONFIG_META), "gptq", False)
    if gptq is not True and gptq is not False:
        raise FxQuantError(f"gptq={gptq!r}: expected True, False or None (the model's QuantConfig.gptq)")
    if gptq or bias_correction:  # refused before anything is observed
        from fxquant.per_layer import refuse_iterator

        refuse_iterator(calib_data, "gptq" if gptq else "bias_correction")
    names = input_names(qmodel)
    n_inputs = n_inputs or len(names)
    was_training = qmodel.training
    qmodel.eval()
    set_fake_quant(qmodel, observe=True, enabled=False)
    seen = 0
    total = len(calib_data) if hasattr(calib_data, "__len__") else None
    for i, batch in enumerate(tqdm(calib_data, desc="calibrate", total=total, disable=not progress, leave=False)):
        inputs = batch_inputs(batch, n_inputs, i, names)
        try:
            qmodel(*inputs)
        except FxQuantError:
            raise
        except Exception as exc:
            raise FxQuantError(f"calib_data batch {i}: the model fails on it ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); each batch holds the model's inputs "
                               f"as example_inputs did ({_shapes(qmodel.meta.get(EXAMPLE_META))}; extra items, labels, "
                               "are ignored)") from exc
        seen += 1
    if seen == 0:
        raise FxQuantError("calib_data is empty: pass an iterable of at least one input batch")
    missed = [name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantize) and not m.calibrated]
    if missed:
        raise FxQuantError(f"calib_data never reached fake-quant nodes {missed}: feed inputs that exercise every branch")
    _refuse_sentinels(qmodel)
    set_fake_quant(qmodel, observe=False, enabled=True)
    if gptq:
        from fxquant.gptq import gptq as round_weights

        round_weights(qmodel, calib_data, n_inputs=n_inputs, progress=progress)
    if bias_correction:
        from fxquant.bias_correction import correct_bias

        correct_bias(qmodel, calib_data, n_inputs=n_inputs, progress=progress)
    qmodel.train(was_training)
    return qmodel


def _shapes(inputs) -> str:
    """'tensors of shape 1x3x8x8, 1x4' (the batch may differ) for a message; '' when unknown."""
    values = inputs.values() if isinstance(inputs, dict) else inputs or ()
    shapes = ", ".join("x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in values)
    return f"tensors of shape {shapes}, any batch size" if shapes else "tensors"


def nothing_to_quantize(qmodel: fx.GraphModule) -> FxQuantError:
    """The error of a model in which no backend row claimed anything, with fxquant.report's reasons."""
    from fxquant.report import report

    return FxQuantError(
        "quantize: nothing to quantize: no backend row claimed any op of this model, so the result would be the float "
        "model. What each op became:\n" + str(report(qmodel)) + "\nFix: check exclude= and leaf_modules=; a layer kept "
        "whole by trace (listed above) quantizes once torch.fx can trace it; a functional conv/linear quantizes when its "
        "weight is a parameter or buffer of the model (not computed in forward)")


def input_names(gm: fx.GraphModule) -> list[str]:
    """The graph's inputs (placeholders) by name, in order."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _refuse_sentinels(qmodel: fx.GraphModule) -> None:
    """An activation whose observed range reaches a sentinel (finfo.min, -1e9: an additive mask; or +-inf) would get
    a scale that rounds every real value to zero (a 1e36 scale): raise, naming the node and the fix.

    A mask's sentinel is negative and lies far below everything else the tensor holds (min <= -SENTINEL while
    max is under SENTINEL_GAP times smaller in magnitude); a large range alone is not one (a deep random-init
    ResNet's ReLU outputs reach 1e6 and quantize as well as any)."""
    for name, fq in qmodel.named_modules():
        if not isinstance(fq, FakeQuantize) or fq.of_weight or not fq.calibrated:
            continue
        lo, hi = float(fq.observer.min_val.min()), float(fq.observer.max_val.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or (lo <= -SENTINEL and -lo >= SENTINEL_GAP * max(abs(hi), 1.0)):
            node = next((n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == name), None)
            source = node.args[0] if node is not None and isinstance(node.args[0], fx.Node) else None
            readers = list(node.users) if node is not None else []
            hint = ", ".join(dict.fromkeys(h for n in [source, *readers] if (h := _exclude_entry(n)) is not None))
            raise FxQuantError(
                f"calibrate: activation '{source.name if source is not None else name}' (fake-quant '{name}') was observed "
                f"in [{lo:.3g}, {hi:.3g}]: sentinel values (at or below -{SENTINEL:g}, far below the rest, or infinite: an "
                f"additive mask's finfo.min or -1e9) "
                f"would give it a scale of {(hi - lo) / 255:.3g}. Keep the op that makes it and the ops that read it float: "
                f"exclude=[{hint}] (a function in exclude= keeps every call of it float), or add the mask inside an "
                "attention row (matmul [* s | / s] + mask -> softmax), which keeps it float by rule.")


def _exclude_entry(node: fx.Node | None) -> str | None:
    """What exclude= takes to keep `node` float, as source text: 'module.name' or a function (operator.add)."""
    if node is None or node.op not in ("call_module", "call_function"):
        return None
    if node.op == "call_module":
        return repr(node.target)
    module = getattr(node.target, "__module__", None) or ""
    return f"{module.lstrip('_')}.{node.target.__name__}" if module else node.target.__name__


def convert(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The reference int8 GraphModule: int8 weights, int32 bias, Q/DQ between ops (ONNX semantics)."""
    if isinstance(qmodel, PendingQuantization):
        raise not_run_yet("convert")
    if isinstance(qmodel, fx.GraphModule) and not fake_quants(qmodel) and qmodel.meta.get(CONFIG_META) is not None:
        raise FxQuantError("convert: this model has no fake-quant left (was it converted already, or its fake-quant "
                           "modules removed?); convert the model fxquant.quantize() returned")
    if not isinstance(qmodel, fx.GraphModule) or not fake_quants(qmodel):
        raise FxQuantError("convert: expected the fake-quant GraphModule returned by fxquant.quantize()")
    int8 = copy.deepcopy(qmodel).eval()
    return run_passes(int8, [lower_to_int8])
