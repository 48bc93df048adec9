"""fxquant: a quantization compiler for PyTorch built on torch.fx."""

from fxquant.api import calibrate, convert, prepare_passes, quantize, set_fake_quant
from fxquant.compare import CompareReport, compare
from fxquant.errors import FxQuantError
from fxquant.onnx_check import check_onnx
from fxquant.onnx_export import export_onnx
from fxquant.mixed_precision import MixedPrecision, mixed_precision
from fxquant.qat import freeze_bn
from fxquant.report import Report, report
from fxquant.sensitivity import SensitivityReport, sensitivity
from fxquant.specs import QuantSpec

__all__ = ["quantize", "calibrate", "convert", "export_onnx", "set_fake_quant", "prepare_passes", "QuantSpec", "FxQuantError",
           "freeze_bn", "report", "Report", "check_onnx",
           "sensitivity", "SensitivityReport", "compare", "CompareReport", "mixed_precision", "MixedPrecision"]
