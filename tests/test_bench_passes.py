"""Smoke tests of the two tools at tiny sizes: bench_passes (pass speed) and coverage (the model zoo)."""

from __future__ import annotations

import json
import math
import operator

import pytest
import torch

from fxquant.passes import trace_model
from fxquant.tools import bench_passes, coverage


def test_chain_has_three_ops_per_block():
    gm = trace_model(bench_passes.chain(7), example_inputs=(torch.randn(1, 4, 4, 4),))
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 7


def test_dense_chain_puts_every_cat_of_the_chain_on_one_fake_quant():
    """Each cat merges its inputs' fake-quants; along a chain of cats the merges compose into one module."""
    import fxquant
    from fxquant.nn import FakeQuantize

    qmodel = fxquant.quantize(bench_passes.dense_chain(6), torch.randn(1, 4, 4, 4), progress=False)
    cats = [n for n in qmodel.graph.nodes if n.target is torch.cat]
    read = {a.target for n in cats for a in n.args[0]}
    assert len(cats) == 6 and len(read) == 1 + 1  # the getitem slice (a share op) and one fake-quant
    fq_names = {name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantize) and "weight" not in name}
    assert read - {operator.getitem} <= fq_names
    called = {n.target for n in qmodel.graph.nodes if n.op == "call_module"}
    assert fq_names <= called  # merged modules were deleted, none left dangling


def test_bench_runs_and_judges_each_target():
    result = bench_passes.run(repeats=1, blocks=[10, 100], size=32)
    r = result["resnet50"]
    assert r["fxquant_s"] > 0 and r["torch_ao_s"] > 0 and r["ratio"] == pytest.approx(r["fxquant_s"] / r["torch_ao_s"])
    assert result["met"]["resnet50_ratio"] == (r["ratio"] <= bench_passes.TARGETS["resnet50_ratio"])
    assert result["met"]["export_resnet50_s"] == (result["export"]["export_s"] < bench_passes.TARGETS["export_resnet50_s"])
    assert set(result["chains"]) == {10, 100} and "chain_scaling" not in result  # the 1k/10k targets need those sizes
    assert set(result["dense_chains"]) == {10, 100} and all(s > 0 for s in result["dense_chains"].values())
    text = bench_passes.table(result)
    assert "prepare_qat_fx" in text and "100 conv-bn-relu blocks" in text and "export_onnx" in text


def test_coverage_rows_in_json_and_markdown_and_a_failure_is_a_row(tmp_path):
    out_json, out_md = tmp_path / "rows.json", tmp_path / "table.md"
    coverage.main(["--models", "shufflenet_v2_x0_5,squeezenet1_1", "--size", "16", "--json", str(out_json), "--markdown", str(out_md)])
    shuffle, squeeze = json.loads(out_json.read_text())["rows"]
    assert shuffle["model"] == "shufflenet_v2_x0_5" and shuffle["traced"] and shuffle["exported"] and shuffle["ort_ran"]
    assert shuffle["layer_steps"] <= 1 and shuffle["passed"] == (shuffle["sqnr_onnx_db"] >= 30 and shuffle["top1_same"])
    assert shuffle["floor_db"] > 0 and shuffle["floor_top1"] in (True, False)  # the reference against itself, nudged
    quantized, total = map(int, shuffle["quantized"].split("/"))
    assert 0 < quantized <= total and not shuffle["error"]
    # 16x16 is too small for squeezenet's pooling: tracing names the node, the run goes on
    assert not squeeze["passed"] and not squeeze["traced"] and not squeeze["exported"]
    assert "FxQuantError: example_inputs: node 'features_8'" in squeeze["error"]
    table = out_md.read_text()
    assert "| shufflenet_v2_x0_5 | 16 | yes | yes |" in table and "| squeezenet1_1 | 16 | **no** |" in table


def test_sqnr_only_row_has_the_full_rows_sqnr_and_nothing_after_it():
    full = coverage._one("shufflenet_v2_x0_5", 32, False, 1)
    short = coverage._one("shufflenet_v2_x0_5", 32, False, 1, sqnr_only=True)
    assert full.exported and full.sqnr_int8_db is not None and not full.error and not short.error
    assert short.sqnr_int8_db == full.sqnr_int8_db  # the same model, inputs and computation, stopped earlier
    assert not short.exported and short.sqnr_onnx_db is None and short.layer_steps is None
    a7 = coverage._one("shufflenet_v2_x0_5", 32, False, 1, sqnr_only=True, a_bits=7)
    assert a7.a_bits == 7 and not a7.error and a7.sqnr_int8_db != short.sqnr_int8_db  # another quantization


def test_timeout_is_a_row():
    class Args:
        timeout, threads, torch_ao, target = 0.01, 1, False, None  # what coverage's argparse gives

    row = coverage._in_subprocess("squeezenet1_1", 48, Args)
    assert row.error == "timed out after 0.01 s" and not row.passed


def test_readme_table_goes_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{coverage.BEGIN}\nold table\n{coverage.END}\ntail\n")
    coverage.write_readme(str(readme), "| new |\n")
    assert readme.read_text() == f"# x\n{coverage.BEGIN}\n| new |\n{coverage.END}\ntail\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(SystemExit, match="add the markers"):
        coverage.write_readme(str(tmp_path / "plain.md"), "| new |\n")


def test_unknown_model_names_are_refused():
    with pytest.raises(SystemExit):
        coverage.main(["--models", "resnet18,not_a_model"])


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one parameter, two modules
        self.shared = torch.nn.Sequential(self.a, torch.nn.BatchNorm1d(4))
        self.register_buffer("steps", torch.zeros(()))


def test_copy_model_copies_what_passes_change_and_keeps_ties():
    from fxquant.api import copy_model

    model = Tied()
    handle = model.a.register_forward_hook(lambda *args: None)
    clone = copy_model(model)
    assert clone.b.weight is clone.a.weight and clone.shared[0] is clone.a  # ties and shared modules survive
    assert clone.a.weight is not model.a.weight and torch.equal(clone.a.weight, model.a.weight)
    assert isinstance(clone.a.weight, torch.nn.Parameter) and clone.a.weight.requires_grad
    with torch.no_grad():
        clone.a.weight.add_(1)
        clone.shared[1].running_mean.add_(1)
        clone.steps.add_(1)
    assert not torch.equal(clone.a.weight, model.a.weight) and model.shared[1].running_mean.abs().sum() == 0
    assert model.steps == 0
    clone.a._forward_hooks.clear()  # hook dicts are the copy's own
    assert handle.id in model.a._forward_hooks
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(copy_model(model).a(x), model.a(x))


def test_same_top1_accepts_tied_maxima_only():
    ref = [[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, 0.0]]
    assert coverage.same_top1(ref, [[0.0, 3.0, 3.1, 0.0], [5.0, 1.0, 0.0, 0.0]])  # row 0 picks the other tied class
    assert not coverage.same_top1(ref, [[3.1, 3.0, 3.0, 0.0], [5.0, 1.0, 0.0, 0.0]])  # class 0 is not a maximum
    assert coverage.sqnr_db([1.0, 2.0], [1.0, 2.0]) == float("inf")
    assert coverage.sqnr_db([3.0, 4.0], [3.0, 4.5]) == pytest.approx(10 * math.log10(25 / 0.25))


def _tiny_net():
    head = torch.nn.Linear(8, 5)
    torch.nn.init.zeros_(head.weight)  # like vit's head
    torch.nn.init.zeros_(head.bias)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 8), head).eval()


def test_zoo_model_randomizes_batchnorms_and_redraws_zero_heads_only():
    from fxquant.tools import bench_deploy, zoo

    torch.manual_seed(0)
    model = _tiny_net()
    hidden = model[5].weight.clone()
    x = torch.randn(2, 3, 8, 8)
    assert model(x).std() == 0  # flat logits: what a comparison must not run on
    g = torch.Generator().manual_seed(1)
    zoo.randomize_batchnorms(model, g)
    assert zoo.redraw_zero_parameters(model, g) == ["6.weight"]
    bn = model[1]
    assert ((bn.running_mean >= -0.1) & (bn.running_mean <= 0.1)).all() and ((bn.running_var >= 0.5) & (bn.running_var <= 1.5)).all()
    assert ((bn.weight >= 0.75) & (bn.weight <= 1.25)).all() and bn.running_var.std() > 0
    assert torch.equal(model[5].weight, hidden)  # a non-zero linear is left as it was
    assert 0.6 < float(model[6].weight.detach().std()) * 8**0.5 < 1.5 and model(x).std() > 0  # N(0, 1/in_features)
    assert bench_deploy._model is zoo.random_model  # one helper for both tools


def test_he_init_draws_at_he_scale():
    from fxquant.tools import zoo

    conv = torch.nn.Conv2d(64, 256, 3)
    torch.nn.init.normal_(conv.weight, std=0.1)  # inception_v3's scale, 2.4x He's at this fan-in
    zoo.he_init(conv, torch.Generator().manual_seed(0))
    assert float(conv.weight.detach().std()) == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.02)
    assert "inception_v3" in zoo.HE_INIT


def test_zoo_redraws_a_zero_token_on_the_unit_scale_and_leaves_zero_biases():
    from fxquant.tools import zoo

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.class_token = torch.nn.Parameter(torch.zeros(1, 1, 256))  # like vit's
            self.proj = torch.nn.Linear(256, 4)
            torch.nn.init.zeros_(self.proj.bias)

    model = Tokens()
    weight = model.proj.weight.clone()
    assert zoo.redraw_zero_parameters(model, torch.Generator().manual_seed(0)) == ["class_token"]
    assert 0.8 < model.class_token.std() < 1.2 and not model.proj.bias.any() and torch.equal(model.proj.weight, weight)
