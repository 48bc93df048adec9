"""Real architectures (random init) through quantize -> convert -> export_onnx -> ONNX Runtime."""

import onnx
import pytest
import torch
import torchvision

import fxquant
from fxquant.check import agreement, ort_session, output_scale, run_onnx


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_zoo_model_reaches_onnxruntime_and_agrees(name, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    example = torch.randn(1, 3, 160, 160)
    calib = [torch.randn(2, 3, 160, 160) for _ in range(2)]
    qmodel = fxquant.quantize(model, example, calib_data=calib, progress=False)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / f"{name}.onnx"
    fxquant.export_onnx(int8, path, example)

    x = torch.randn(4, 3, 160, 160)
    with torch.no_grad():
        ref = int8(x).numpy()
    optimized = tmp_path / "opt.onnx"
    got = agreement(ref, run_onnx(ort_session(path, optimized_path=optimized), x), output_scale(int8))
    assert got.within_one_step >= 0.999, got
    assert got.top1 == 1.0, got

    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert "Conv" not in ops and "Gemm" not in ops, "every Conv/Gemm should run as an integer kernel"
    assert ops.count("QLinearConv") == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
