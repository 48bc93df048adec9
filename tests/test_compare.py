"""fxquant.compare: float, fake-quant, int8 and the ONNX file in ONNX Runtime, layer by layer (seconds; one qemu run).

Planted faults: a file whose QuantizeLinear of one layer has its scale altered (the named layer must be that
one), and the default 8-bit file run as an AVX2 CPU without VNNI under qemu (its u8 x s8 kernels saturate).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.compare import compare


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A reduce_range model (7-bit weights: exact on every CPU), its int8 graph and ONNX file."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Net().eval()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    qmodel = fxquant.quantize(model, x[:1], calib_data=[x], reduce_range=True, progress=False)
    int8 = fxquant.convert(qmodel)
    path = str(tmp_path_factory.mktemp("cmp") / "net.onnx")
    fxquant.export_onnx(int8, path, x[:1])
    return model, qmodel, int8, path, x


def test_a_correct_file_is_within_one_step_everywhere(built):
    model, qmodel, int8, path, x = built
    rep = compare(model, qmodel, int8, path, x)
    assert rep.first_divergent is None
    names = [p.name for p in rep.points]
    assert names[:2] == ["x_fq", "conv1_fq"] and "conv3_fq" in names
    for p in rep.points:
        assert p.steps_int8_onnx <= 1
        if not math.isnan(p.steps_fq_int8):
            assert p.steps_fq_int8 <= 1  # fake-quant and int8 graph: the same integers up to float rounding


def test_sqnr_against_float_two_ways(built):
    """The last point's int8 SQNR vs float, recomputed from the float model and int8 graph outputs by hand."""
    model, qmodel, int8, path, x = built
    rep = compare(model, qmodel, int8, path, x)
    with torch.no_grad():
        f, q = model(x).double(), int8(x).double()
    expected = 10 * math.log10(float((f ** 2).sum() / ((q - f) ** 2).sum()))
    last = rep.points[-1]
    assert last.name == "fc_fq" and last.layer == "fc"
    # the points' float values come from the BatchNorm-folded trace: float rounding apart from model(x) (~1e-5 dB)
    assert last.sqnr_int8_db == pytest.approx(expected, abs=1e-3)
    assert rep.output_sqnr_db["int8"] == pytest.approx(expected, abs=1e-9)  # this one reads model(x) itself
    assert last.max_abs_int8 == pytest.approx(float((q - f).abs().max()), rel=1e-4)


def _alter_scale(path: str, out: str, point: str, factor: float) -> None:
    """Give the QuantizeLinear producing `point` its own scale initializer, `factor` times the original."""
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    (node,) = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == point]
    scale = onnx.numpy_helper.to_array(inits[node.input[1]]) * np.float32(factor)
    m.graph.initializer.append(onnx.numpy_helper.from_array(scale.astype(np.float32), f"{point}_planted_scale"))
    node.input[1] = f"{point}_planted_scale"
    onnx.save_model(m, out)


@pytest.mark.parametrize("point", ["conv2_fq", "conv3_fq"])
def test_planted_scale_fault_is_named(built, tmp_path, point):
    model, qmodel, int8, path, x = built
    planted = str(tmp_path / "planted.onnx")
    _alter_scale(path, planted, point, 1.25)
    rep = compare(model, qmodel, int8, planted, x)
    assert rep.first_divergent == point
    by = {p.name: p for p in rep.points}
    assert by[point].steps_int8_onnx > 1
    # teacher forcing: the layers before it are untouched, so the fault does not smear upstream
    before = [p for p in rep.points[: [p.name for p in rep.points].index(point)]]
    assert all(p.steps_int8_onnx <= 1 for p in before)


def test_a_file_of_another_graph_is_refused(built, tmp_path):
    model, qmodel, int8, path, x = built
    other = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    q2 = fxquant.quantize(other, x[:1], calib_data=[x], progress=False)
    other_path = str(tmp_path / "other.onnx")
    fxquant.export_onnx(fxquant.convert(q2), other_path, x[:1])
    with pytest.raises(fxquant.FxQuantError, match="is not the file this int8 graph exports to"):
        compare(model, qmodel, int8, other_path, x)
    with pytest.raises(fxquant.FxQuantError, match="no such file"):
        compare(model, qmodel, int8, str(tmp_path / "missing.onnx"), x)
    with pytest.raises(fxquant.FxQuantError, match="reference int8 GraphModule"):
        compare(model, qmodel, qmodel, path, x)


def test_report_files_are_viewer_overlays(built, tmp_path):
    model, qmodel, int8, path, x = built
    rep = compare(model, qmodel, int8, path, x)
    paths = rep.save(str(tmp_path / "cmp"))
    assert {p.rsplit(".", 1)[1] for p in paths} == {"json", "png", "svg"}
    overlay = json.load(open(str(tmp_path / "cmp.steps_int8_onnx.json")))
    assert overlay["better"] == "lower" and set(overlay["values"]) >= {"conv1", "conv2", "conv3", "fc"}
    int8_nodes = {n.name for n in int8.graph.nodes}
    assert set(overlay["values"]) <= int8_nodes | {"x"}
    assert all(math.isfinite(v) for o in rep.overlays() for v in o["values"].values())


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user not installed")
def test_a_vnni_layer_run_as_haswell_is_the_layer_named(tmp_path):
    """The planted fault: target="vnni" keeps 8-bit weights (exact only with VNNI); every GEMM but conv2 is
    narrowed to 7 bits by layer_bits, so conv2 alone can saturate ONNX Runtime's AVX2 u8 x s8 pair sums. Run
    as Haswell (qemu), compare names conv2's point; run as Nehalem (SSE4, no pair sums) it names none."""
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # conv2's weights all of one sign per output channel: adjacent products add up
        model.conv2.weight.abs_()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2)) * 4
    narrow = {name: (7, 8) for name in ("conv1", "conv3", "fc")}
    qmodel = fxquant.quantize(model, x[:1], calib_data=[x], target="vnni", layer_bits=narrow, progress=False)
    int8 = fxquant.convert(qmodel)
    path = str(tmp_path / "vnni.onnx")
    fxquant.export_onnx(int8, path, x[:1])
    rep = compare(model, qmodel, int8, path, x, cpu="Haswell")
    assert rep.first_divergent == "conv2_fq", str(rep)
    assert rep.cpu == "haswell" and "AVX2" in rep.isa and "conv2_fq" in str(rep)
    assert compare(model, qmodel, int8, path, x, cpu="nehalem").first_divergent is None


def test_improvement_own_weights_equal_float_until_the_weights_move(built, tmp_path):
    """Two PTQ models: their own weights are the float model's, so "vs own" equals "vs FP32" (two computations,
    the float trace of `model` and the fake-quant graph with its fake-quants off). Moving one model's weights
    (as QAT does) lowers its SQNR against FP32 but not against its own weights."""
    from fxquant.compare import improvement

    model, qmodel, int8, path, x = built
    import copy

    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.conv2.weight.mul_(1.3)
    moved = fxquant.quantize(shifted, x[:1], calib_data=[x], reduce_range=True, progress=False)
    imp = improvement(model, {"PTQ": qmodel, "moved": moved}, x)
    rows = {name: vals for name, *vals in imp.rows()}
    ptq_fp32, moved_fp32, ptq_own, moved_own = rows["conv3_fq"]
    assert ptq_fp32 == pytest.approx(ptq_own, abs=1e-3)
    assert moved_fp32 < ptq_fp32 - 3 and moved_own > moved_fp32 + 3
    assert rows["conv1_fq"][1] == pytest.approx(rows["conv1_fq"][3], abs=1e-3)  # upstream of the move: the same
    assert imp.own["moved"].output_sqnr_db["int8"] > imp.reports["moved"].output_sqnr_db["int8"] + 3
    paths = imp.save(str(tmp_path / "imp"))
    assert any(p.endswith("imp.sqnr_int8_db_moved_own.json") for p in paths) and "vs own" in str(imp)
