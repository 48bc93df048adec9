"""tools/bench_deploy: the --quick smoke run measures what the full run reports, and bad flags are refused."""

from __future__ import annotations

import json

import pytest

from fxquant.tools import bench_deploy


def test_quick_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_deploy.main(["--quick", "--json", str(out), "--keep", str(tmp_path / "files")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("CPU: ") and "| model | batch | fused fxquant |" in printed and "| resnet18 | 1 | 100% |" in printed
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["fused"]["fxquant"] == 1.0 and row["fused"]["float"] == 0.0  # float: every Conv/Gemm stays float
    assert 0 <= row["fused"]["ort_default"] <= 1 and 0 <= row["fused"]["ort_u8s8"] <= 1
    assert row["ratio"]["float"] == 1.0 and all(r > 0 for r in row["ratio"].values())
    assert 0.2 < row["file_ratio"]["fxquant"] < 0.3  # int8 weights: about a quarter of float32
    assert set(data["targets"]) == set(bench_deploy.targets([bench_deploy.Result(**row)]))
    assert data["cpu_isa"] and row["ops"]["fxquant_vnni"] == row["ops"]["fxquant"]  # 7-bit GEMMs: the same kernels
    assert row["fused"]["fxquant_vnni"] == 1.0
    assert row["ops"]["fxquant"]["QLinearConv"] == 20 and "Conv" not in row["ops"]["fxquant"]  # resnet18's 20 convs
    assert row["ops"]["float"]["Conv"] + row["ops"]["float"].get("FusedConv", 0) == 20
    assert row["p_tie"]["ort_u8s8"] is None  # 3 rounds cannot show "faster": 1/8 by chance alone
    assert "- fxquant faster than ORT quantize_static U8S8 per-channel (every row, sign test p < 0.05): not measured" in printed
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f"resnet18_{v}.onnx" for v in sorted(bench_deploy.VARIANTS)]


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet18,not_a_model"], "not_a_model"),
    (["--batches", "0"], "--batches"),
    (["--batches", "one"], "--batches"),
])
def test_bad_flags_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_deploy.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_sign_test_asks_for_enough_paired_wins():
    assert bench_deploy.sign_test(20, 20) == 0.5**20
    assert bench_deploy.sign_test(15, 20) < 0.05 < bench_deploy.sign_test(14, 20)  # 0.021, 0.058
    assert bench_deploy.sign_test(10, 20) > 0.5
    assert bench_deploy.sign_test(3, 3) is None and bench_deploy.sign_test(5, 5) == 1 / 32


def _row(p_default, p_u8s8, ops_u8s8):
    ops = {"QLinearConv": 3, "QuantizeLinear": 1, "DequantizeLinear": 1}
    return bench_deploy.Result("m", 1, 32, fused={"fxquant": 1.0}, ratio={"fxquant": 0.4}, file_ratio={"fxquant": 0.26},
                               p_tie={"ort_default": p_default, "ort_u8s8": p_u8s8}, ops={"fxquant": ops, "ort_u8s8": ops_u8s8})


def test_a_lower_median_without_enough_wins_is_not_faster():
    marks = {k.split(" (")[0]: v for k, v in bench_deploy.targets([_row(0.001, 0.25, {})]).items()}
    assert marks["fxquant faster than ORT quantize_static defaults"] is True
    assert marks["fxquant faster than ORT quantize_static U8S8 per-channel"] is False
    marks = {k.split(" (")[0]: v for k, v in bench_deploy.targets([_row(0.001, None, {})]).items()}
    assert marks["fxquant faster than ORT quantize_static U8S8 per-channel"] is None


def test_identical_optimised_graphs_are_named():
    same = _row(0.001, 0.5, {"QLinearConv": 3, "QuantizeLinear": 1, "DequantizeLinear": 1})
    other = _row(0.001, 0.5, {"QLinearConv": 2, "Conv": 1, "QuantizeLinear": 1, "DequantizeLinear": 2})
    other.model = "n"
    assert bench_deploy.same_graphs([same, other]) == ["m"]
