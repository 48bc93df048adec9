"""tools/bench_deploy: the --quick smoke run measures what the full run reports, and bad flags are refused."""

from __future__ import annotations

import json

import pytest

from fxquant.tools import bench_deploy


def test_quick_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_deploy.main(["--quick", "--json", str(out), "--keep", str(tmp_path / "files")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| model | batch | fused fxquant |") and "| resnet18 | 1 | 100% |" in printed
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["fused"]["fxquant"] == 1.0 and row["fused"]["float"] == 0.0  # float: every Conv/Gemm stays float
    assert 0 <= row["fused"]["ort_default"] <= 1 and 0 <= row["fused"]["ort_u8s8"] <= 1
    assert row["ratio"]["float"] == 1.0 and all(r > 0 for r in row["ratio"].values())
    assert 0.2 < row["file_ratio"]["fxquant"] < 0.3  # int8 weights: about a quarter of float32
    assert set(data["targets"]) == set(bench_deploy.targets([bench_deploy.Result(**row)]))
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
