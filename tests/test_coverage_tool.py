"""tools/coverage's bookkeeping (no model is run: its per-model subprocess is replaced)."""

from __future__ import annotations

import json
from dataclasses import asdict

from fxquant.tools import coverage
from fxquant.tools.coverage import Row


def test_update_reruns_only_the_named_models_and_keeps_the_other_rows(tmp_path, monkeypatch):
    old = [Row("alexnet", 224, sqnr_int8_db=41.0), Row("resnet18", 64, sqnr_int8_db=30.0), Row("vgg11", 64, error="old")]
    (tmp_path / "old.json").write_text(json.dumps({"torch_ao": False, "rows": [asdict(r) | {"passed": r.passed} for r in old]}))
    ran = []

    def fake(name, size, args):
        ran.append(name)
        return Row(name, size, sqnr_int8_db=33.0, error="new")

    monkeypatch.setattr(coverage, "_in_subprocess", fake)
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{coverage.BEGIN}\nold table\n{coverage.END}\ntail\n")
    assert coverage.main(["--update", str(tmp_path / "old.json"), "--models", "vgg11,resnet18", "--json",
                          str(tmp_path / "new.json"), "--readme", str(readme)]) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "new.json").read_text())["rows"]}
    assert ran == ["vgg11", "resnet18"] and list(rows) == ["alexnet", "resnet18", "vgg11"]  # sorted, no duplicates
    assert rows["alexnet"]["sqnr_int8_db"] == 41.0 and rows["resnet18"]["error"] == rows["vgg11"]["error"] == "new"
    text = readme.read_text()
    assert "old table" not in text and "| alexnet |" in text and text.endswith(f"{coverage.END}\ntail\n")
