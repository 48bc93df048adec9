"""Smoke tests of the QAT benchmarks at their --quick sizes: they run, every row is there, the
targets are judged from the figures they print (the figures themselves are the tools' job)."""

from __future__ import annotations

import json

import pytest

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


def test_accuracy_bench_runs_only_the_named_rows(tmp_path):
    report = bench_qat_accuracy.main(["--quick", "--threads", "1", "--rows", "PTQ W4A8"])
    assert set(report["mean"]) == {"FP32", "PTQ W4A8"} and set(report["paired"]) == {"PTQ W4A8"}
    assert set(report["targets"]) == {"every fxquant row >= torch.ao"}  # the FP32-based targets need rows not run
    pr = report["paired"]["PTQ W4A8"]
    assert pr["differences"] == [report["mean"]["PTQ W4A8"]["fxquant"] - report["mean"]["PTQ W4A8"]["torch.ao"]]


def test_accuracy_bench_names_the_rows_when_one_is_unknown(capsys):
    with pytest.raises(SystemExit):
        bench_qat_accuracy.main(["--quick", "--rows", "QAT W4A9"])
    err = capsys.readouterr().err
    assert "QAT W4A9" in err and "'QAT W4A8'" in err


def test_paired_comparison_counts_signs_and_brackets_the_mean():
    pr = bench_qat_accuracy.paired([0.1, 0.2, 0.0, 0.3, 0.1, 0.2])
    assert (pr["wins"], pr["losses"], pr["ties"]) == (5, 0, 1)
    assert pr["sign_p"] == pytest.approx(2 / 2**5)  # two-sided, ties dropped: 2 * (1/2)^5
    assert pr["mean"] == pytest.approx(0.15) and pr["ci95"][0] < 0.15 < pr["ci95"][1]
    assert 0 < pr["ci95"][0]  # every difference >= 0 and most > 0: the interval excludes zero
    even = bench_qat_accuracy.paired([0.1, -0.1, 0.2, -0.2])
    assert even["sign_p"] == 1.0 and even["ci95"][0] < 0 < even["ci95"][1]
