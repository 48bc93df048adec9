"""Deployment targets (fxquant.backends.Target) and ONNX Runtime on emulated CPUs (fxquant.check).

The portable target narrows only the weights that reach a pair-summing integer GEMM; a file exported for
"vnni" is exact on VNNI CPUs but saturates on AVX2, which qemu's Haswell reproduces on any x86 host, so
these tests give the same verdict whatever CPU runs them.
"""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxquant
from fxquant import check
from fxquant.backends import BACKEND_META, load_backend
from fxquant.demo import DigitNet, load_digits
from fxquant.onnx.metadata import TARGET_KEY

from conftest import assert_file_matches_int8, randomize_batchnorms


class Mixed(nn.Module):
    """A 3x3 conv, a depthwise conv, a grouped conv (2 channels per group), a depthwise conv with channel
    multiplier 2, a linear: which of them reach MLAS's u8 x s8 GEMM decides their weight width."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.multiplier = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.multiplier(torch.relu(self.grouped(torch.relu(self.dw(torch.relu(self.conv(x))))))))
        return self.fc(x.mean((2, 3)))


def _saturating(model: nn.Module) -> nn.Module:
    """Every weight at 0.9-1.0 of its tensor's largest magnitude, signs kept: adjacent products of one sign
    are common, the case a 16-bit pair sum cannot hold at 8 bits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.sign() * p.abs().clamp(min=0.9 * float(p.abs().max())))
    return model


def _quantize(target=None, **options):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    calib = [torch.rand(4, 3, 8, 8, generator=g) for _ in range(3)]  # uniform: the uint8 codes span 0-255
    qmodel = fxquant.quantize(_saturating(Mixed()).eval(), calib[0], calib_data=calib, target=target, progress=False,
                              **options)
    return qmodel, calib


def _weight_peaks(qmodel) -> dict:
    return {name: m.weight_fq.spec.qmax for name, m in qmodel.named_modules() if getattr(m, "weight_fq", None) is not None}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{target: (int8 graph, path)} of Mixed, exported for portable and for vnni."""
    out = {}
    for target in ("portable", "vnni"):
        qmodel, calib = _quantize(target)
        path = tmp_path_factory.mktemp(target) / "mixed.onnx"
        fxquant.export_onnx(qmodel, path, calib[0])
        out[target] = fxquant.convert(qmodel), path
    return out


def test_portable_narrows_only_the_weights_that_reach_a_pair_summing_gemm():
    assert _weight_peaks(_quantize()[0]) == {"conv": 63, "dw": 127, "grouped": 63, "multiplier": 63, "fc": 63}
    assert set(_weight_peaks(_quantize("vnni")[0]).values()) == {127}


def test_narrower_activations_leave_room_for_8_bit_weights():
    """At 7-bit activations two products reach 2 * 127 * 127 = 32258 <= 32767: no weight needs narrowing;
    at 4-bit weights nothing changes either."""
    assert set(_weight_peaks(_quantize(a_bits=7)[0]).values()) == {127}
    assert set(_weight_peaks(_quantize(w_bits=4)[0]).values()) == {7}


def test_layer_bits_cannot_widen_a_weight_past_the_target():
    qmodel, _ = _quantize(layer_bits={"fc": (8, 8), "dw": (8, 8)})
    assert _weight_peaks(qmodel)["fc"] == 63 and _weight_peaks(qmodel)["dw"] == 127


def test_the_target_is_recorded_in_the_model_the_pickle_and_the_file(files):
    for target, (int8, path) in files.items():
        assert int8.meta[BACKEND_META].target.name == target
        assert pickle.loads(pickle.dumps(int8.meta[BACKEND_META])).target.name == target
        assert {p.key: p.value for p in onnx.load(path).metadata_props}[TARGET_KEY] == target


def test_an_unknown_target_names_the_targets():
    with pytest.raises(fxquant.FxQuantError, match=r"target='avx2'.*'portable', 'vnni'"):
        _quantize("avx2")
    with pytest.raises(fxquant.FxQuantError, match=r"target='vnni'.*'tensorrt'"):
        load_backend("tensorrt", target="vnni")


def test_check_onnx_names_every_gemm_a_vnni_file_can_saturate(files):
    _, path = files["vnni"]
    assert fxquant.check_onnx(path) == []  # against its own target
    found = fxquant.check_onnx(path, target="portable")
    assert sorted(v.node.split("_")[0] for v in found) == ["conv", "fc", "grouped", "multiplier"], found  # not dw
    assert all("16-bit pair sum" in v.message and "x64quantprecision" in v.message for v in found)
    _, portable = files["portable"]
    assert fxquant.check_onnx(portable) == [] and fxquant.check_onnx(portable, target="vnni") == []


def test_the_portable_file_agrees_with_the_reference_on_every_cpu(files):
    int8, path = files["portable"]
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    runs = assert_file_matches_int8(int8, path, x, "portable file")
    assert [run.isa for run in runs][1:] == ["AVX2 (no VNNI)", "SSE4"]  # the emulated CPUs are what they claim


def test_a_vnni_file_run_as_an_avx2_cpu_is_caught_at_the_saturating_layer(files):
    """The planted fault: the same network at 8-bit weights, run as Haswell. The layer named is a GEMM
    (never the depthwise conv, whose kernel widens to int32)."""
    int8, path = files["vnni"]
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    run = check.layerwise(int8, path, x, cpu="haswell")
    assert run.max_steps > 1 and run.worst.split("_fq")[0] in ("conv", "grouped", "multiplier", "fc"), run
    assert run.steps.get("dw_fq", 0) <= 1


def test_the_demo_model_agrees_on_every_cpu(tmp_path):
    torch.manual_seed(0)
    x_train, _, x_test, _ = load_digits(seed=0, limit=600)
    model = randomize_batchnorms(DigitNet()).eval()
    calib = [x_train[i:i + 64] for i in range(0, 256, 64)]
    qmodel = fxquant.quantize(model, calib[0], calib_data=calib, progress=False)
    fxquant.export_onnx(qmodel, tmp_path / "digits.onnx", calib[0])
    assert_file_matches_int8(fxquant.convert(qmodel), tmp_path / "digits.onnx", x_test[:32], "demo model")


def test_an_unknown_cpu_names_the_cpus(files):
    _, path = files["portable"]
    with pytest.raises(fxquant.FxQuantError, match=r"cpu='pentium'.*'cortex-a72', 'haswell', 'nehalem', 'neoverse-n1'"):
        check.run_file(path, torch.rand(1, 3, 8, 8), cpu="pentium")


@pytest.mark.parametrize("cpu", ["haswell", "neoverse-n1"])
def test_missing_qemu_names_the_package(monkeypatch, files, cpu):
    import shutil

    _, path = files["portable"]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(check, "_RUNTIMES", {})
    with pytest.raises(fxquant.FxQuantError, match="install the qemu-user package"):
        check.run_file(path, torch.rand(1, 3, 8, 8), cpu=cpu)


def test_a_missing_arm_root_names_the_tool_that_builds_it(monkeypatch, tmp_path, files):
    _, path = files["portable"]
    monkeypatch.setenv("FXQUANT_AARCH64_ROOT", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(check, "_RUNTIMES", {})
    with pytest.raises(fxquant.FxQuantError, match=r"nothing-here holds none: build it with `python -m fxquant.tools.aarch64_root`"):
        check.run_file(path, torch.rand(1, 3, 8, 8), cpu="cortex-a72")


@pytest.mark.parametrize("cpu, isa", [("cortex-a72", "Arm NEON"), ("neoverse-n1", "Arm NEON + dot product")])
def test_arm_cpus_run_both_targets_exactly(files, cpu, isa):
    """MLAS's Arm kernels (NEON widening multiplies without dot product, UDOT/SDOT with it) accumulate in
    32 bits, so on Arm the 8-bit vnni file is as exact as the portable one: both within one step at every
    layer, run as that CPU under qemu-aarch64 (measured; the same vnni file is tens of steps off as Haswell)."""
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    for target in ("portable", "vnni"):
        int8, path = files[target]
        run = check.layerwise(int8, path, x, cpu=cpu)
        assert run.isa == isa and run.max_steps <= 1, (target, run)


def test_an_emulated_run_that_does_not_answer_times_out():
    with pytest.raises(fxquant.FxQuantError, match="no answer in 0 s"):
        check.EmulatedRuntime("haswell", timeout=0.01)


def test_an_emulated_run_reports_a_broken_file(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(fxquant.FxQuantError, match="failed on"):
        check.emulated("haswell").run(tmp_path / "broken.onnx", {"x": np.zeros((1, 3), np.float32)})
    assert check.emulated("haswell").process.poll() is None  # the worker survives a bad request


def test_host_isa_is_one_of_the_known_names():
    assert check.host_isa() in ("AVX-512 VNNI", "AVX-VNNI", "AVX-512 (no VNNI)", "AVX2 (no VNNI)", "SSE4", "SSSE3",
                                "x86-64 baseline", "Arm NEON + dot product", "Arm NEON", "aarch64", "arm64")


def test_the_exported_weights_hold_the_bound(files):
    """The file itself: every weight initializer of a GEMM within +-64 on portable."""
    _, path = files["portable"]
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    peaks = {n.name: int(np.abs(inits[n.input[0]].astype(np.int64)).max()) for n in model.graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8}
    assert peaks and all(p <= 64 or name.startswith("dw") for name, p in peaks.items()), peaks


def test_target_cost_table_subtracts_per_model_and_names_failures(tmp_path, capsys):
    from fxquant.tools import target_cost

    portable = {"rows": [{"model": "a", "sqnr_int8_db": 30.0}, {"model": "b", "sqnr_int8_db": None}]}
    vnni = {"rows": [{"model": "a", "sqnr_int8_db": 33.5}, {"model": "b", "sqnr_int8_db": 20.0}]}
    paths = []
    for name, rows in (("p.json", portable), ("v.json", vnni)):
        (tmp_path / name).write_text(__import__("json").dumps(rows))
        paths.append(str(tmp_path / name))
    assert target_cost.main(["--from-json", *paths]) == 0
    out = capsys.readouterr().out
    assert "| a | 30.0 | 33.5 | -3.5 |" in out and "| b | failed | 20.0 | failed |" in out
    assert "median difference -3.5 dB over 1 models" in out


def test_target_cost_table_adds_the_7_bit_activation_column():
    from fxquant.tools import target_cost

    rows = {"portable": [{"model": "a", "sqnr_int8_db": 30.0}, {"model": "b", "sqnr_int8_db": 31.0}],
            "vnni": [{"model": "a", "sqnr_int8_db": 33.5}, {"model": "b", "sqnr_int8_db": 34.0}],
            target_cost.A7: [{"model": "a", "sqnr_int8_db": 31.0}, {"model": "b", "sqnr_int8_db": None}]}
    out = target_cost.table(rows)
    assert "| a | 30.0 | 33.5 | -3.5 | 31.0 | -2.5 |" in out and "| b | 31.0 | 34.0 | -3.0 | failed | failed |" in out
    assert "median difference -3.2 dB over 2 models" in out
    assert "median difference (portable, 7-bit activations) -2.5 dB over 1 models" in out


def test_target_cost_table_orders_the_gptq_column_before_the_7_bit_one():
    from fxquant.tools import target_cost

    rows = {"portable": [{"model": "a", "sqnr_int8_db": 30.0}], "vnni": [{"model": "a", "sqnr_int8_db": 33.5}],
            target_cost.A7: [{"model": "a", "sqnr_int8_db": 31.0}],
            target_cost.GPTQ: [{"model": "a", "sqnr_int8_db": 35.0, "calibrate_s": 12.25}]}
    rows["portable"][0]["calibrate_s"] = 0.5
    out = target_cost.table(rows)
    assert ("| portable + GPTQ (dB) | that - vnni (dB) | portable at 7-bit activations, 8-bit weights (dB) | that - vnni (dB) "
            "| calibration, portable (s) | with GPTQ (s) |") in out
    assert "| a | 30.0 | 33.5 | -3.5 | 35.0 | +1.5 | 31.0 | -2.5 | 0.5 | 12.2 |" in out
    assert "median difference (portable + GPTQ) +1.5 dB over 1 models" in out


def test_target_cost_update_reruns_only_the_named_models(tmp_path, monkeypatch, capsys):
    import json

    from fxquant.tools import target_cost

    old = {"portable": [{"model": "resnet18", "sqnr_int8_db": None}, {"model": "alexnet", "sqnr_int8_db": 39.0}],
           "vnni": [{"model": "resnet18", "sqnr_int8_db": 33.0}, {"model": "alexnet", "sqnr_int8_db": 41.0}],
           target_cost.GPTQ: [{"model": "alexnet", "sqnr_int8_db": 42.0}]}  # a variant not rerun is kept
    (tmp_path / "old.json").write_text(json.dumps(old))
    ran = []

    def fake_run(models, **kwargs):
        ran.append(models)
        return {"portable": [{"model": "resnet18", "sqnr_int8_db": 29.0}], "vnni": [{"model": "resnet18", "sqnr_int8_db": 32.5}]}

    monkeypatch.setattr(target_cost, "run", fake_run)
    assert target_cost.main(["--models", "resnet18", "--update", str(tmp_path / "old.json"), "--json", str(tmp_path / "new.json")]) == 0
    assert ran == [["resnet18"]]
    new = json.loads((tmp_path / "new.json").read_text())
    assert [r["sqnr_int8_db"] for r in new["portable"]] == [29.0, 39.0] and [r["sqnr_int8_db"] for r in new["vnni"]] == [32.5, 41.0]
    assert new[target_cost.GPTQ] == old[target_cost.GPTQ]
    assert "| resnet18 | 29.0 | 32.5 | -3.5 |" in capsys.readouterr().out


def test_target_cost_join_formats_several_runs_as_one_table(tmp_path, capsys):
    import json

    from fxquant.tools import target_cost

    parts = [{"portable": [{"model": m, "sqnr_int8_db": p}], "vnni": [{"model": m, "sqnr_int8_db": v}]}
             for m, p, v in (("a", 30.0, 33.0), ("b", 31.0, 35.0))]
    paths = []
    for i, part in enumerate(parts):
        paths.append(str(tmp_path / f"{i}.json"))
        (tmp_path / f"{i}.json").write_text(json.dumps(part))
    assert target_cost.main(["--join", *paths]) == 0
    out = capsys.readouterr().out
    assert "| a | 30.0 | 33.0 | -3.0 |" in out and "| b | 31.0 | 35.0 | -4.0 |" in out and "over 2 models" in out
