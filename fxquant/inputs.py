"""A model's inputs as fxquant reads them: example inputs and calibration batches, each a tuple of tensors.

    as_inputs(x)                      a tensor -> (x,); a non-empty tuple or list -> a tuple; else FxQuantError
    batch_inputs(batch, n, i)         the first n items of calibration batch i (a DataLoader's (x, y) -> (x,)), finite
"""

from __future__ import annotations

import torch

from fxquant.errors import FxQuantError


def as_inputs(example_inputs, name="example_inputs") -> tuple:
    """`example_inputs` as a tuple of the model's positional inputs; `name` is the argument an error names."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise FxQuantError(f"{name}: expected a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(inputs)


def batch_inputs(batch, n_inputs: int, index: int) -> tuple:
    """The model's inputs in calibration batch `index`: its first `n_inputs` items, checked finite."""
    inputs = as_inputs(batch, name=f"calib_data batch {index}")[:n_inputs]
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise FxQuantError(f"calib_data batch {index} contains NaN or Inf; calibration needs finite inputs")
    return inputs
