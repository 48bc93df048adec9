"""fxquant: a quantization compiler for PyTorch built on torch.fx.

The public API (everything else is reached by its module: fxquant.nn, fxquant.passes, fxquant.backends...):

    quantize(model, [example_inputs], [config], calib_data=..., **options) -> fake-quant GraphModule
    QuantConfig: the options as one value
    calibrate(qmodel, data)          convert(qmodel) -> reference int8 GraphModule
    export_onnx(model, path, example_inputs)             check_onnx(path) -> rule violations
    set_fake_quant / freeze_bn       report(qmodel) -> Report     prepare_passes(config)    QuantSpec, FxQuantError
    viz(model_or_onnx, example_inputs, "page.html") -> every stage on one self-contained HTML page
    sensitivity(model, data) -> SensitivityReport     mixed_precision(...) -> MixedPrecision (layer_bits / exclude)
    compare(model, qmodel, int8, onnx_path, inputs, cpu=None) -> CompareReport (layer by layer, by node name)
    register_stand_in(module_type, make)   a traceable stand-in for a module class (your own attention)
"""

from fxquant.api import calibrate, convert, prepare_passes, quantize
from fxquant.compare import CompareReport, compare
from fxquant.config import QuantConfig
from fxquant.errors import FxQuantError
from fxquant.mixed_precision import MixedPrecision, mixed_precision
from fxquant.nn import set_fake_quant
from fxquant.onnx import check_onnx, export_onnx
from fxquant.qat import freeze_bn
from fxquant.report import Report, report
from fxquant.sensitivity import SensitivityReport, sensitivity
from fxquant.specs import QuantSpec
from fxquant.stand_ins import register_stand_in
from fxquant import viz  # a package you can call: fxquant.viz(model, ...) is fxquant.viz.viz(model, ...)

__all__ = ["quantize", "calibrate", "convert", "export_onnx", "check_onnx", "QuantConfig", "set_fake_quant", "freeze_bn",
           "report", "Report", "prepare_passes", "QuantSpec", "FxQuantError", "viz",
           "sensitivity", "SensitivityReport", "compare", "CompareReport", "mixed_precision", "MixedPrecision",
           "register_stand_in"]
