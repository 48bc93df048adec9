"""A quantized model whose shapes are not known yet: what quantize(model) returns with no inputs and no data.

torch.fx traces without inputs; the passes after it read shapes. So quantize(model) keeps a copy of the
model and the config, and the first call supplies the example inputs:

    qmodel = fxquant.quantize(model)          # a PendingQuantization: nothing traced yet
    qmodel(x)  or  fxquant.calibrate(qmodel, data)
        -> the prepare pipeline runs once, on x (or data's first batch), exactly as quantize(model, x) would,
           and qmodel becomes that fake-quant GraphModule, in place (the same object the caller holds)

Until then nothing that needs the quantized layers works, and each says what to do: parameters() and
state_dict() (an optimizer made now would hold parameters that are not the quantized model's),
fxquant.convert and fxquant.export_onnx.
"""

from __future__ import annotations

from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.inputs import one_row


def not_run_yet(what: str) -> FxQuantError:
    return FxQuantError(
        f"{what}: this model from fxquant.quantize(model) has not run yet, so its layers (which need the input "
        "shapes) do not exist. Fix: call it once, qmodel(x), or fxquant.calibrate(qmodel, data); or give "
        "fxquant.quantize(model, example_inputs) or fxquant.quantize(model, calib_data=data)"
    )


class PendingQuantization(nn.Module):
    """The float model (a copy) and a `build(model, example_inputs) -> GraphModule` to run at the first call.

    `n_inputs`: how many positional inputs the model's forward takes (None: all a batch holds), for
    reading them out of a calibration batch.
    """

    def __init__(self, model: nn.Module, build, n_inputs: int | None, training: bool):
        super().__init__()
        self.model = model  # a submodule, so .to(device) before the first call moves it
        self.build, self.n_inputs = build, n_inputs
        self.train(training)

    def materialize(self, example_inputs: tuple, *, recorded: tuple) -> fx.GraphModule:
        """Run the prepare pipeline on `example_inputs` and become its GraphModule (this object, in place).
        `recorded`: the inputs the model keeps for export_onnx (one row of them: see fxquant.inputs.one_row)."""
        built = self.build(self.model, example_inputs, recorded=recorded)
        built.train(self.training)  # a train() / eval() made before the first call holds
        self.__class__ = type(built)  # a GraphModule's class is its own subclass (its forward is generated)
        object.__setattr__(self, "__dict__", built.__dict__)
        self.graph.owning_module = self
        return self

    def __call__(self, *args, **kwargs):
        if kwargs and args:
            raise FxQuantError(f"the first call of a model from fxquant.quantize(model) takes its inputs positionally "
                               f"or all as keywords (they become example_inputs); got both, keywords {sorted(kwargs)}")
        inputs = dict(kwargs) if kwargs else args
        self.materialize(inputs, recorded=one_row(inputs))
        return self(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        raise not_run_yet("parameters()")

    def named_parameters(self, *args, **kwargs):
        raise not_run_yet("named_parameters()")

    def state_dict(self, *args, **kwargs):
        raise not_run_yet("state_dict()")

    def load_state_dict(self, *args, **kwargs):
        raise not_run_yet("load_state_dict()")
