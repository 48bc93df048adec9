"""Every FxQuantError a user can cause, each with a few lines of user code that causes it.

    python -m fxquant.tools.error_catalog [--readme README.md] [--check]

Runs every example of fxquant.tools.error_examples (tiny models, the public API only; 18.6 s wall for the whole
run, measured with /usr/bin/time on a 2-core AMD EPYC VM at load average 5.5, about 10 s at load 1.5), captures the FxQuantError each raises, where it was raised (the innermost fxquant frame of the
traceback: module and function) and its message, and prints the catalogue as Markdown: one `<details>` group
per call that raises, one row per error (what was wrong / the code / the message's first line). `--readme`
rewrites the catalogue between the markers <!-- fxquant-errors:begin --> and <!-- fxquant-errors:end -->;
`--check` exits 1 when an example raises nothing or another exception type.

`raise_sites()` reads fxquant's source (fxquant/ and passes/, which installs as fxquant.passes) with `ast` and
lists every function that raises an FxQuantError: `raise FxQuantError(...)`, or `raise helper(...)` where the
helper returns one (fxquant.pending.not_run_yet). tests/test_error_catalog.py wants each of them to be the raise
site of at least one example, or in INTERNAL below with the reason no user input reaches it: a new raise site
without an example fails that test.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import linecache
import os
import re
import shlex
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from fxquant.tools import error_examples
from fxquant.tools.error_examples import Example

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"fxquant": ROOT / "fxquant", "fxquant.passes": ROOT / "passes"}
BEGIN, END = "<!-- fxquant-errors:begin -->", "<!-- fxquant-errors:end -->"
MESSAGE_CHARS = 260  # a message's first line is cut here in the README (the full text is in the tool's output)

# Raise sites (module, function qualname) no user input reaches, and why. Keep it short and true.
INTERNAL = {
    ("fxquant.backends", "_check_one_kind"): "checks fxquant's own backend tables when they load (a contributor's "
                                             "contradictory row); QuantConfig.backend takes a name, not a table",
    ("fxquant.backends", "_check_shared_group"): "the same, for share_inputs rows fed with different specs",
    ("fxquant.passes.insert_fake_quant", "_share_inputs"): "needs a backend table whose share_inputs producers have "
                                                           "different specs, which _check_shared_group refuses in "
                                                           "fxquant's tables (a Backend built by hand is not checked)",
    ("fxquant.onnx.export", "_simplify"): "onnxsim dropping a weight DequantizeLinear: a guard on onnxsim, not on "
                                          "the input",
    ("fxquant.check", "EmulatedRuntime._reply"): "ONNX Runtime under qemu crashing or not answering",
    ("fxquant.check", "EmulatedRuntime.run"): "the emulated ONNX Runtime process died between two calls",
    ("fxquant.qat", "assert_ranks_agree"): "needs torch.distributed ranks that disagree (a DDP bug)",
    ("fxquant.onnx.shape", "emit_pad"): "torch.nn.functional.pad itself accepts only the four modes the exporter exports",
    ("fxquant.gptq", "_inverse_factor"): "H = X X^T + damp * mean(diag) * I is positive definite for finite X (dead "
                                         "inputs get diag 1), and calibration refuses non-finite batches",
    ("fxquant.nn", "BnFolded.weight_qparams"): "fxquant.gptq, its only caller, skips the folds that do not commute "
                                               "(roundable_layers)",
    ("fxquant.mixed_precision", "solve"): "mixed_precision passes solve() one budget and widths that include float "
                                          "(always feasible); the errors guard a direct call of the solver",
}


@dataclass
class Outcome:
    example: Example
    error: BaseException | None  # what the last line raised (None: nothing)
    line: int | None  # the example's line that raised (1-based)
    site: tuple[str, str] | None  # (module, function) of the innermost fxquant frame
    message: str = ""  # str(error), the temporary folder written "."

    @property
    def ok(self) -> bool:
        from fxquant.errors import FxQuantError

        return isinstance(self.error, FxQuantError) and self.line == len(self.example.code.splitlines())


def _qualnames(tree: ast.AST) -> dict[ast.AST, str]:
    """{node: qualname of the function or class it is in, as the interpreter names it ('' at module level)}."""
    names: dict[ast.AST, str] = {}

    def visit(node, prefix: str, scope: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = prefix + child.name
                inner = qual + (".<locals>." if not isinstance(child, ast.ClassDef) else ".")
                names[child] = qual
                visit(child, inner, qual)
            else:
                names[child] = scope
                visit(child, prefix, scope)

    visit(tree, "", "")
    return names


def _called(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return None


def raise_sites() -> dict[tuple[str, str], list[int]]:
    """{(module, function qualname): [line, ...]} for every statement of fxquant that raises an FxQuantError it
    builds: `raise FxQuantError(...)`, or `raise f(...)` where a function f of fxquant returns FxQuantError(...)."""
    trees = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            module = ".".join((package, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
            trees[module] = ast.parse(path.read_text(), str(path))
    builders = {"FxQuantError"} | {  # functions whose return value is an FxQuantError they build
        fn.name for tree in trees.values() for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for r in ast.walk(fn) if isinstance(r, ast.Return) and _called(r.value) == "FxQuantError"}
    sites: dict[tuple[str, str], list[int]] = {}
    for module, tree in trees.items():
        scope = _qualnames(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and _called(node.exc) in builders:
                sites.setdefault((module, scope[node] or "<module>"), []).append(node.lineno)
    return sites


def _site(tb) -> tuple[str, str] | None:
    """(module, qualname) of the innermost frame of `tb` that is fxquant's code."""
    site = None
    for frame, _ in traceback.walk_tb(tb):
        module = frame.f_globals.get("__name__", "")
        ours = module == "fxquant" or (module.startswith("fxquant.") and not module.startswith("fxquant.tools"))
        if ours and not frame.f_code.co_filename.startswith("<"):  # not a dataclass's generated __init__
            site = (module, frame.f_code.co_qualname)
    return site


def _example_line(tb, filename: str) -> int | None:
    line = None
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def run_example(example: Example, prelude: dict) -> Outcome:
    """Run `example` in a fresh copy of `prelude`'s names (in the current folder); what it raised and where."""
    from fxquant.cli import build_parser

    lines = example.code.splitlines()
    filename = f"<example {example.what}>"
    names = dict(prelude)
    if lines[-1].startswith("$ fxquant "):
        names["_argv"] = shlex.split(lines[-1][len("$ fxquant "):])
        names["_parse"] = build_parser().parse_args
        lines = lines[:-1] + ["_args = _parse(_argv); _args.run(_args)"]
    source = "\n".join(lines) + "\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks and fx show the line
    environ = dict(os.environ)  # an example may change it (PATH without Graphviz): put back after
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            exec(compile(source, filename, "exec"), names)
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the catalogue reports it
        if isinstance(exc, KeyboardInterrupt):
            raise
        return Outcome(example, exc, _example_line(exc.__traceback__, filename), _site(exc.__traceback__),
                       str(exc).replace(os.getcwd(), "."))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return Outcome(example, None, None, None)


def run_all(examples=None) -> list[Outcome]:
    """Every example, each in its own copy of the prelude, in a temporary working folder; the working folder,
    sys.path and the environment variables are the caller's again afterwards."""
    examples = error_examples.EXAMPLES if examples is None else examples
    prelude: dict = {}
    here, environ = os.getcwd(), dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="fxquant-errors-") as folder:
        os.chdir(folder)
        sys.path.insert(0, folder)  # as `python -m fxquant` has the current folder: the CLI's --model mymodels:build
        try:
            exec(compile(error_examples.PRELUDE, "<prelude>", "exec"), prelude)
            return [run_example(e, prelude) for e in examples]
        finally:
            sys.path.remove(folder)
            os.chdir(here)
            os.environ.clear()  # an example may set a variable (FXQUANT_AARCH64_ROOT); the caller's are put back
            os.environ.update(environ)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _span(text: str) -> str:
    """`text` as one Markdown code span (nothing in it is read as Markdown or HTML), fenced by more backticks than
    it holds in a row; leading indentation kept as no-break spaces; `|` escaped for the table."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    body = "\u00a0" * (len(text) - len(text.lstrip(" "))) + text.lstrip(" ")
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{_cell(body)}{pad}{fence}"


def _code(code: str) -> str:
    """The example, one code span per line joined by `<br>` (a Markdown table cell holds no fenced block)."""
    return "<br>".join(_span(line) for line in code.splitlines())


def first_line(message: str) -> str:
    """The message's first line, cut at MESSAGE_CHARS; "…" where something was left out."""
    lines = message.splitlines() or [""]
    line = lines[0] if len(lines[0]) <= MESSAGE_CHARS else lines[0][: MESSAGE_CHARS - 1]
    return line + (" …" if line != message else "")


def markdown(outcomes: list[Outcome]) -> str:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.example.call, []).append(o)
    lines = [f"{len(outcomes)} examples (`python -m fxquant.tools.error_catalog --readme README.md` runs them and writes "
             "this section; tests/test_error_catalog.py checks that every `raise` of an FxQuantError in fxquant is one "
             "of them, or listed in the tool's INTERNAL with the reason no input reaches it). Each example runs after:",
             "", "```python", error_examples.PRELUDE.strip(), "```", ""]
    for call, group in groups.items():
        lines += [f"<details><summary><code>{call}</code>: {len(group)} error{'s' * (len(group) > 1)}</summary>", "",
                  "| what was wrong | example | message (first line) |", "|---|---|---|"]
        for o in group:
            shown = first_line(o.message) if o.ok else f"NOT RAISED AS DOCUMENTED: {type(o.error).__name__}: {o.message}"
            lines.append(f"| {_cell(o.example.what)} | {_code(o.example.code)} | {_span(shown)} |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def write_readme(path: str, text: str) -> None:
    from fxquant.tools.coverage import write_readme as write_between

    write_between(path, text, BEGIN, END)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxquant.tools.error_catalog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", help="rewrite the catalogue between the markers of this README")
    parser.add_argument("--check", action="store_true", help="exit 1 if an example does not raise as documented")
    args = parser.parse_args(argv)
    outcomes = run_all()
    text = markdown(outcomes)
    if args.readme:
        write_readme(args.readme, text)
    else:
        print(text)
    bad = [o for o in outcomes if not o.ok]
    for o in bad:
        print(f"error_catalog: {o.example.call}: {o.example.what}: {type(o.error).__name__ if o.error else 'nothing raised'} "
              f"at line {o.line}: {o.message[:300]}", file=sys.stderr)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
