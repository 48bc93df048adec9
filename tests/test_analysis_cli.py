"""`fxquant sensitivity` and `fxquant compare` in-process, on a model and data named MODULE:FUNCTION (seconds)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from fxquant.cli import main

MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()

    def data():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(50, 64, generator=g), torch.randint(0, 10, (50,), generator=g)) for _ in range(2)]
""")


@pytest.fixture
def spec(tmp_path, monkeypatch):
    (tmp_path / "cli_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_models"
    sys.modules.pop("cli_models", None)


def test_sensitivity_command_writes_table_json_overlays_plots(spec, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sensitivity", "--model", f"{spec}:model", "--data", f"{spec}:data", "--out", str(out), "--no-progress",
                 "--mixed-precision", "--max-drop", "20"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"sensitivity.txt", "sensitivity.json", "sensitivity.png", "sensitivity.svg", "mixed_precision.txt",
            "sensitivity.local_sqnr_db.json"} <= files
    overlay = json.loads((out / "sensitivity.local_sqnr_db.json").read_text())
    assert set(overlay["values"]) == {"_1", "_3"}  # the two Linear layers' node names
    assert "sensitivity at W4A4" in capsys.readouterr().out


def test_compare_command_names_no_layer_for_a_reduce_range_file(spec, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", "--model", f"{spec}:model", "--data", f"{spec}:data", "--out", str(out), "--no-progress",
                 "--reduce-range"]) == 0
    assert "within one step of the int8 reference at every layer" in capsys.readouterr().out
    doc = json.loads((out / "compare.json").read_text())
    assert doc["first_divergent"] is None and [p["name"] for p in doc["points"]] == ["_0_fq", "_1_fq", "_3_fq"]


def test_bad_model_spec_is_an_error_naming_it(spec, tmp_path, capsys):
    assert main(["compare", "--model", "no_such_module:model", "--data", f"{spec}:data", "--out", str(tmp_path)]) == 1
    assert "--model 'no_such_module:model': cannot import it" in capsys.readouterr().err
