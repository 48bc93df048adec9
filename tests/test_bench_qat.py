"""Smoke tests of the QAT benchmarks at their --quick sizes: they run, every row is there, the
targets are judged from the figures they print (the figures themselves are the tools' job)."""

from __future__ import annotations

import json

from fxquant.tools import bench_qat, bench_qat_accuracy


def test_qat_step_bench_times_every_contestant(tmp_path):
    out = tmp_path / "step.json"
    summary = bench_qat.main(["--quick", "--threads", "1", "--json", str(out)])
    assert {"float", "fxquant ste", "torch.ao"} <= set(summary)
    assert all(v["median_ms"] > 0 for v in summary.values()) and summary["float"]["x_float"] == 1.0
    assert json.loads(out.read_text())["summary"].keys() == summary.keys()


def test_accuracy_bench_fills_both_columns_and_judges_the_means(tmp_path):
    out = tmp_path / "acc.json"
    report = bench_qat_accuracy.main(["--quick", "--threads", "1", "--json", str(out)])
    rows = [name for name, _, _ in bench_qat_accuracy.ROWS] + ["FP32 + QAT epochs"]
    assert set(report["mean"]) == set(rows)
    for row in rows:
        for lib in bench_qat_accuracy.LIBS:
            assert 0 <= report["mean"][row][lib] <= 100
    mean = report["mean"]
    assert report["targets"]["every fxquant row >= torch.ao"] == all(v["fxquant"] >= v["torch.ao"] for v in mean.values())
    assert "| PTQ W4A4 |" in bench_qat_accuracy.format_table(report)
