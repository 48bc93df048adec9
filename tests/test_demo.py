"""`fxquant demo --fast`: the same figures two ways (the function and the command), each checked for sense."""

import json
import os
import subprocess
import sys

import onnx
import pytest

from fxquant.cli import build_parser
from fxquant.demo import DigitNet, format_table, load_digits, run_demo

ACCURACY_KEYS = ("fp32_acc", "ptq_fake_quant_acc", "ptq_acc", "qat_fake_quant_acc", "qat_acc", "onnx_acc")
REQUIRED_KEYS = ACCURACY_KEYS + (
    "onnx_top1_agreement", "fp32_onnx_bytes", "int8_onnx_bytes", "fp32_latency_ms", "int8_latency_ms", "latency_ratio",
    "fp32_latency_large_ms", "int8_latency_large_ms", "latency_ratio_large", "large_batch", "cpu_isa", "target",
)


def check_figures(r: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in r]
    assert not missing, f"demo figures lack {missing}"
    for key in ACCURACY_KEYS:
        assert 0.0 <= r[key] <= 100.0, f"{key}={r[key]} is not a percentage"
    # each accuracy is a whole number of test digits
    for key in ACCURACY_KEYS:
        assert r[key] * r["n_test"] / 100 == pytest.approx(round(r[key] * r["n_test"] / 100), abs=1e-6), key
    assert 0.0 <= r["onnx_top1_agreement"] <= 1.0
    # ONNX Runtime and the reference int8 graph can differ in accuracy only on digits where they disagree
    assert abs(r["onnx_acc"] - r["qat_acc"]) <= 100 * (1 - r["onnx_top1_agreement"]) + 1e-6
    assert 0 < r["int8_onnx_bytes"] < r["fp32_onnx_bytes"], "the int8 ONNX file should be smaller than the float one"
    assert r["fp32_latency_ms"] > 0 and r["int8_latency_ms"] > 0
    assert r["latency_ratio"] == pytest.approx(r["fp32_latency_ms"] / r["int8_latency_ms"])
    assert r["latency_ratio_large"] == pytest.approx(r["fp32_latency_large_ms"] / r["int8_latency_large_ms"])
    assert r["large_batch"] > 1 and r["cpu_isa"] and r["target"] == "portable"


def test_run_demo_fast_keeps_files_and_writes_json(tmp_path):
    out, json_path = tmp_path / "onnx", tmp_path / "figures.json"
    table = []
    r = run_demo(epochs=1, qat_epochs=1, fast=True, json_path=str(json_path), out_dir=str(out), progress=False,
                 echo=table.append)
    check_figures(r)
    assert r["fast"] is True and r["n_train"] + r["n_test"] <= 1000
    assert sorted(os.listdir(out)) == ["digitnet_fp32.onnx", "digitnet_int8.onnx", "qat_improvement.json",
                                       "qat_improvement.png", "qat_improvement.sqnr_int8_db_PTQ.json",
                                       "qat_improvement.sqnr_int8_db_PTQ_own.json", "qat_improvement.sqnr_int8_db_QAT.json",
                                       "qat_improvement.sqnr_int8_db_QAT_own.json", "qat_improvement.svg"]
    assert [row[0] for row in r["qat_improvement"]["rows"]][:2] == ["x_fq", "stem_0_fq"]
    assert os.path.getsize(r["int8_onnx_path"]) == r["int8_onnx_bytes"]
    ops = {node.op_type for node in onnx.load(r["int8_onnx_path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Add"} <= ops  # QDQ, not a float file renamed
    assert "QuantizeLinear" not in {node.op_type for node in onnx.load(r["fp32_onnx_path"]).graph.node}
    assert json.loads(json_path.read_text()) == r
    (text,) = table
    for row in ("FP32", "PTQ int8", "QAT int8", "ONNX Runtime int8", "What QAT improved", "model output (logits)"):
        assert row in text
    assert f"{r['fp32_acc']:.2f} %" in text and f"{r['onnx_acc']:.2f} %" in text


def test_cli_demo_fast_json(tmp_path):
    json_path = tmp_path / "figures.json"
    cmd = [sys.executable, "-m", "fxquant", "demo", "--fast", "--no-progress", "--json", str(json_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(json_path.read_text())
    check_figures(r)
    assert "fp32_onnx_path" not in r  # no --out: the files went to a temporary folder
    assert "ONNX Runtime int8" in done.stdout and f"{r['qat_acc']:.2f} %" in done.stdout


def test_split_is_stratified_seeded_and_disjoint():
    x_train, y_train, x_test, y_test = load_digits(seed=0)
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert y_test.bincount(minlength=10).tolist() == [100] * 10
    assert abs(float(x_train.mean())) < 1e-3 and abs(float(x_train.std()) - 1) < 1e-3  # standardised on train
    train_rows = {row.numpy().tobytes() for row in x_train.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in x_test.flatten(1))
    again = load_digits(seed=0)
    assert (again[3] == y_test).all() and (again[2] == x_test).all()
    assert not (load_digits(seed=1)[3] == y_test).all()


def test_digitnet_output_shape():
    x, *_ = load_digits(seed=0, limit=20)
    assert DigitNet()(x[:3]).shape == (3, 10)


def test_format_table_one_row_per_artefact():
    r = dict.fromkeys(ACCURACY_KEYS, 99.0) | {
        "onnx_top1_agreement": 0.999, "fp32_onnx_bytes": 4096, "int8_onnx_bytes": 1024, "size_ratio": 4.0,
        "fp32_latency_ms": 0.2, "int8_latency_ms": 0.1, "latency_ratio": 2.0, "latency_runs": 10,
        "fp32_latency_large_ms": 9.0, "int8_latency_large_ms": 3.0, "latency_ratio_large": 3.0, "large_batch": 256,
        "cpu_isa": "AVX2 (no VNNI)", "target": "portable",
        "n_train": 8, "n_test": 2, "epochs": 1, "qat_epochs": 1, "seed": 0,
    }
    text = format_table(r)
    rows = [line for line in text.splitlines() if line.endswith((" ms", " %"))]
    assert [row.split("  ")[0] for row in rows] == ["FP32 (PyTorch)", "PTQ int8 (reference)", "QAT int8 (reference)",
                                                   "ONNX Runtime int8 (QAT)"]
    assert "4.0 KiB" in text and "1.0 KiB" in text and "99.90 %" in text and "2.00x" in text
    assert "3.00x at batch 256" in text and "CPU: AVX2 (no VNNI)" in text and "target: portable" in text


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--qat-epochs", "-1"], []])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
