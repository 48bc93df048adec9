"""A model's inputs as fxquant reads them: example inputs and calibration batches, each a tuple of tensors.

    as_inputs(x)                      a tensor -> (x,); a non-empty tuple or list -> a tuple; a dict stays a dict (keyword
                                      inputs: the graph's placeholders order them, by_name); else FxQuantError
    batch_inputs(batch, n, i)         the first n items of calibration batch i (a DataLoader's (x, y) -> (x,)), finite
    forward_arity(model, fixed)       how many positional inputs model.forward takes (None: *args, all of a batch)
    first_batch(calib_data, n)        the first batch's inputs, and calib_data to iterate in full
    one_row(inputs)                   the first row of each (what a model records for export_onnx)
NOT_GIVEN is the default of an example_inputs left out (None given is a mistake, and is named as one).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping

import torch
from torch import nn

from fxquant.errors import FxQuantError


def as_inputs(example_inputs, name="example_inputs") -> tuple | dict:
    """`example_inputs` as a tuple of the model's positional inputs, or a dict of keyword inputs (a tokenizer's
    output); `name` is the argument an error names."""
    if isinstance(example_inputs, Mapping) and example_inputs:
        return dict(example_inputs)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise FxQuantError(f"{name}: expected a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(inputs)


def by_name(inputs, names) -> tuple:
    """A dict of keyword inputs as the tuple of its values for the graph's inputs `names`; a tuple as it is."""
    if not isinstance(inputs, Mapping):
        return inputs
    missing = [n for n in names if n not in inputs]
    if missing:
        raise FxQuantError(f"inputs: the quantized model reads {list(names)}; the dict given lacks {missing}")
    return tuple(inputs[n] for n in names)


def batch_inputs(batch, n_inputs: int, index: int, names=None) -> tuple | dict:
    """The model's inputs in calibration batch `index`: its first `n_inputs` items (a dict: the inputs `names`,
    or all of it), checked finite."""
    inputs = as_inputs(batch, name=f"calib_data batch {index}")
    if isinstance(inputs, dict):
        inputs = by_name(inputs, names) if names is not None else inputs
    else:
        inputs = inputs[:n_inputs]
    for t in (inputs.values() if isinstance(inputs, dict) else inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise FxQuantError(f"calib_data batch {index} contains NaN or Inf; calibration needs finite inputs")
    return inputs


class _NotGiven:
    def __repr__(self) -> str:
        return "<taken from calib_data or the first call>"


NOT_GIVEN = _NotGiven()
EXAMPLE_META = "fxquant_example_inputs"  # GraphModule.meta key: the inputs export_onnx uses when given none


def one_row(inputs: tuple) -> tuple:
    """The first row of each tensor that has rows (a copy: the batch it came from is not kept alive)."""
    if isinstance(inputs, dict):
        return dict(zip(inputs, one_row(tuple(inputs.values()))))
    return tuple(t[:1].clone() if isinstance(t, torch.Tensor) and t.dim() else t for t in inputs)


def forward_arity(model: nn.Module, fixed=()) -> int | None:
    """The positional parameters of `model.forward` without a default, other than those in `fixed`
    (concrete_args' names): the inputs a calibration batch gives (forward(x, mask=None) reads x from a
    DataLoader's (x, y); the mask takes its default). None when forward takes *args."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward Python cannot introspect: take every item of a batch
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in fixed and p.default is p.empty
               for p in parameters)


def first_batch(calib_data, n_inputs: int | None) -> tuple[tuple, object]:
    """(the model's inputs in calib_data's first batch, calib_data to calibrate on: all of it, the first batch
    included; a one-shot iterator, a generator, is given its first batch back)."""
    try:
        iterator = iter(calib_data)
    except TypeError:
        raise FxQuantError(f"calib_data: expected an iterable of batches (a list, a DataLoader), got {type(calib_data).__name__}") from None
    try:
        first = next(iterator)
    except StopIteration:
        raise FxQuantError("calib_data is empty: pass an iterable of at least one input batch") from None
    if iterator is calib_data:
        calib_data = itertools.chain([first], iterator)
    inputs = batch_inputs(first, n_inputs, 0)
    if n_inputs is not None and not isinstance(inputs, dict) and len(inputs) < n_inputs:
        raise FxQuantError(f"calib_data batch 0 holds {len(inputs)} input(s) and the model's forward takes {n_inputs}: "
                           "make each batch a tuple of the inputs (extra items, labels, are ignored), or pass example_inputs=")
    return inputs, calib_data
