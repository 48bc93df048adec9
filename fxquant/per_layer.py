"""What bias correction and GPTQ share: a calibrated fake-quant model, read layer by layer on calibration data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import fx

from fxquant.errors import FxQuantError
from fxquant.inputs import batch_inputs
from fxquant.nn import FakeQuantize, fake_quants


def refuse_iterator(calib_data, option: str) -> None:
    """FxQuantError if `calib_data` is an iterator (a generator can be read once; `option` reads it once per layer)."""
    if isinstance(calib_data, Iterator):
        raise FxQuantError(f"calib_data: {option} reads it once more per layer, and an iterator "
                           f"({type(calib_data).__name__}) can be read once; pass a list or a DataLoader")


@contextmanager
def layer_by_layer(qmodel: fx.GraphModule, calib_data, *, n_inputs: int | None, who: str, option: str):
    """Check that `qmodel` is a calibrated fake-quant model, put it in eval mode and yield `batches`, a function
    returning a fresh iterator over the model's inputs in `calib_data`; the fake-quant flags and the train /
    eval mode are restored afterwards. `who` and `option` (calibrate's keyword) name the caller in errors.
    Raises FxQuantError before changing anything for a model that is not a calibrated fake-quant model, or for
    `calib_data` that is an iterator (a generator can be read once; the caller reads it once per layer)."""
    refuse_iterator(calib_data, option)
    if not isinstance(qmodel, fx.GraphModule) or not fake_quants(qmodel):
        raise FxQuantError(f"{who}: expected the fake-quant GraphModule returned by fxquant.quantize()")
    uncalibrated = [name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantize) and not m.calibrated]
    if uncalibrated:
        raise FxQuantError(f"{who}: fake-quant nodes {uncalibrated} have no range; calibrate first "
                           f"(fxquant.calibrate(qmodel, data, {option}=True) does both)")
    names = [n.target for n in qmodel.graph.nodes if n.op == "placeholder"]  # a dict batch is read by name
    n_inputs = n_inputs or len(names)

    def batches():
        return (batch_inputs(batch, n_inputs, i, names) for i, batch in enumerate(calib_data))

    flags = [(fq, fq.observe, fq.enabled) for fq in fake_quants(qmodel)]
    was_training = qmodel.training
    qmodel.eval()
    try:
        yield batches
    finally:
        for fq, observe, enabled in flags:
            fq.observe, fq.enabled = observe, enabled
        qmodel.train(was_training)


class _Stop(Exception):
    """Raised by a recording hook once a layer's inputs are read: the rest of the forward is not needed."""


def read_layer_inputs(qmodel: fx.GraphModule, layers: list, record, batches, *, stop: bool) -> int:
    """Run `qmodel` on every batch of `batches()` with `record(i, args)` called on the inputs of `layers[i]` (a
    forward pre-hook); with `stop` each forward ends at the first of them. Returns the number of batches run."""
    def hook(i: int):
        def pre(module, args):
            record(i, args)
            if stop:
                raise _Stop
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    seen = 0
    try:
        for inputs in batches():
            seen += 1
            try:
                qmodel(*inputs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return seen
