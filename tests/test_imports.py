"""The package's import structure: no import cycles, no reach into another module's private names, every
module importable first in a fresh interpreter, and a public API that lists nothing else.

The cycle check reads the source, so an import inside a function (the usual way a cycle is hidden) counts
like one at the top. `from fxquant.onnx import shape` is an edge to the submodule fxquant.onnx.shape, `from fxquant.backends
import Rule` one to the package fxquant.backends (its __init__).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx

import fxquant

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"fxquant": ROOT / "fxquant", "fxquant.passes": ROOT / "passes", "fxquant.tools": ROOT / "tools"}


def package_modules() -> dict[str, Path]:
    """{module name: file} for every module fxquant installs (pyproject maps passes/ and tools/ into it)."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_names(path: Path, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((base, [a.name for a in node.names]))
    return found


def import_graph(modules: dict[str, Path]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        for target, names in imported_names(path, module, path.name == "__init__.py"):
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            for t in targets:
                if t in modules and t != module:
                    graph.add_edge(module, t)
    return graph


def test_the_module_list_covers_the_layout():
    modules = package_modules()
    for name in ("fxquant.api", "fxquant.config", "fxquant.onnx.export", "fxquant.onnx.walk", "fxquant.onnx.shape",
                 "fxquant.passes.trace_model", "fxquant.tools.zoo"):
        assert name in modules


def test_no_import_cycles():
    graph = import_graph(package_modules())
    assert graph.number_of_edges() > 50  # the parse found the imports
    cycles = sorted(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_the_cycle_check_sees_an_import_inside_a_function(tmp_path):
    """The check above must fail on what the old api <-> bias_correction pair did: a lazy import back."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from pkg.b import g\n")
    b.write_text("from pkg.a import f\n")
    graph = import_graph({"pkg.a": a, "pkg.b": b})
    assert list(nx.simple_cycles(graph)) == [["pkg.a", "pkg.b"]] or list(nx.simple_cycles(graph)) == [["pkg.b", "pkg.a"]]


def test_no_module_imports_another_modules_private_names():
    modules = package_modules()
    reach_ins = []
    for module, path in modules.items():
        for target, names in imported_names(path, module, path.name == "__init__.py"):
            if not target.startswith("fxquant"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            reach_ins += [f"{module} imports {target}.{n}" for n in private]
    assert not reach_ins, reach_ins


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported as the first fxquant module of its own process (a fork of one that loaded only
    third-party packages, so the imports cost one torch start-up): an import-order cycle fails here."""
    if not hasattr(os, "fork"):
        import pytest

        pytest.skip("needs os.fork")
    script = textwrap.dedent("""
        import importlib, os, sys, traceback
        import numpy, onnx, onnxruntime, torch, torchvision, torchvision.models, networkx, ml_dtypes, tqdm.auto  # no fxquant yet
        assert not [m for m in sys.modules if m.split(".")[0] == "fxquant"]
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed.append(name)
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    names = sorted(n for n in package_modules() if not n.endswith(".__main__"))  # `python -m fxquant` runs the CLI
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_the_public_api_is_all_that_fxquant_exports():
    public = {n for n in vars(fxquant) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(fxquant, n)).__name__ == "module"}  # submodules Python sets as attributes
    assert public - modules == set(fxquant.__all__)
    assert {"quantize", "calibrate", "convert", "export_onnx", "check_onnx", "QuantConfig", "FxQuantError"} <= set(fxquant.__all__)
