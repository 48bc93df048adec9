"""Model-zoo coverage: every torchvision classification model, random init, through to ONNX Runtime.

    python -m fxquant.tools.coverage [--models a,b] [--markdown OUT] [--json OUT] [--readme README.md] [--torch-ao]
    python -m fxquant.tools.coverage --update OLD.json --models a,b --json NEW.json --readme README.md
                                     # rerun some models, keep the other rows of OLD.json

One row per model: quantize (PTQ, a few random calibration batches) -> convert -> export_onnx ->
ONNX Runtime, and how the ONNX output agrees with the reference int8 graph (SQNR in dB, top-1 on
the batch) and how the reference int8 graph agrees with the float model. A model passes when ONNX
Runtime runs it with SQNR >= 30 dB against the reference int8 graph and the same top-1 on every row
(where the reference's quantized logits tie at the top, any of the tied classes counts).

`layerwise max steps` is the teacher-forced check (`fxquant.check.layerwise`): each layer of the reference
computed from ONNX Runtime's own inputs against ONNX Runtime's output of it. It does not compound
through depth, so it tells an exporter bug (> 1 step somewhere) from a network that amplifies the
one-step rounding differences of two float implementations block after block (output SQNR low,
every layer within one step). `SQNR int8 vs int8, input nudged` measures that amplification: the
reference int8 model against itself with its input moved by 1e-6 of its range (NUDGE), about what
a different float summation order does, and `nudged top-1 same` whether its top-1 survives it. Where
that floor is under 30 dB, or the nudge alone flips a top-1, no second implementation of the same
integers (ONNX Runtime's) can be expected to do better; the pass criterion stays as it is, the
columns say why a row misses it.

`--torch-ao` fills the same table for PyTorch's FX quantization (prepare_fx, calibration,
convert_to_reference_fx, torch.onnx.export; SQNR of ONNX Runtime against that reference model).

Models are built as torchvision builds them (random weights, seeded, eval mode; no weights are
downloaded), then made non-degenerate by `fxquant.tools.zoo.random_model`, the same helper
tools/bench_deploy.py uses: torchvision's BatchNorm statistics of 0 and 1 shrink a depthwise net's
activations block after block (efficientnet's logits varied by ~1e-14, mobilenet's by ~1e-10), so
every BatchNorm gets seeded random statistics and affine parameters around those defaults; and a
Linear initialised to zero (vit's head: logits exactly 0) gets seeded normal weights; inception_v3,
whose init is chaotic (logits ~1e8), is drawn at He's scale (see fxquant.tools.zoo). Otherwise
"exact" and "same top-1" would compare constants. The `float logits std` column records the spread.

Each model runs in its own subprocess under a timeout, so a crash, a hang or running out of memory
is a failed row, not a failed run. Inputs are 64x64 where the architecture allows (fast), 224x224
where it needs it (vit and maxvit have fixed sizes, swin's windows want it; vgg/alexnet's classifiers
read the 7x7/6x6 maps their features make at 224), 75x75
for inception_v3 (its minimum). `--readme` rewrites the table between the markers
<!-- fxquant-coverage:begin --> and <!-- fxquant-coverage:end -->.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

PASS_DB = 30.0
MARKER = "FXQUANT-COVERAGE-ROW "
BEGIN, END = "<!-- fxquant-coverage:begin -->", "<!-- fxquant-coverage:end -->"
SIZES = {"vit": 224, "swin": 224, "maxvit": 224, "vgg": 224, "alexnet": 224, "inception": 75}
DEFAULT_SIZE = 64
CALIB_BATCHES, BATCH = 3, 2
TEST_BATCH = 4


@dataclass
class Row:
    model: str
    size: int
    target: str | None = None  # the onnxruntime backend's deployment target (None: its default, portable)
    a_bits: int = 8  # fxquant's activation width (7 on portable: the weights of the integer GEMMs stay 8-bit)
    gptq: bool = False  # fxquant: weights rounded by GPTQ on the calibration batches (QuantConfig.gptq)
    traced: bool = False
    fused: bool = False
    quantized: str = ""  # ops claimed by a quantize row / all ops (fxquant); "" for torch.ao
    floats: str = ""  # float by rule + no rule
    leaves: int | None = None
    exported: bool = False
    ort_ran: bool = False
    sqnr_onnx_db: float | None = None  # ONNX Runtime vs the reference int8 model
    sqnr_int8_db: float | None = None  # the reference int8 model vs the float model
    top1_same: bool | None = None  # ONNX Runtime's argmax is the reference's (one of its tied maxima) on every row
    float_std: float | None = None  # spread of the float model's logits: ~0 means a random init whose signal vanished
    floor_db: float | None = None  # the reference int8 model against itself with its input nudged by NUDGE: its noise floor
    floor_top1: bool | None = None  # ... and whether its top-1 survives that nudge
    layer_steps: float | None = None  # teacher-forced: largest ORT-vs-reference difference at any layer, in steps
    quantize_s: float | None = None  # fxquant: quantize() without calibration; torch.ao: prepare_fx
    export_s: float | None = None
    calibrate_s: float | None = None  # fxquant: calibrate() on the CALIB_BATCHES (with GPTQ when the row has it)
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.ort_ran and self.sqnr_onnx_db is not None and self.sqnr_onnx_db >= PASS_DB and bool(self.top1_same)


def input_size(name: str) -> int:
    return next((size for prefix, size in SIZES.items() if name.startswith(prefix)), DEFAULT_SIZE)


NUDGE = 1e-6  # relative size of the input nudge that measures a model's noise floor (float32 rounding is ~6e-8)


def nudged(x):
    """`x` plus seeded noise of NUDGE * max|x|: what a reordered float sum does to an input, roughly."""
    import torch

    return x + NUDGE * x.abs().max() * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))


def sqnr_db(reference, other) -> float:
    """10 log10(|reference|^2 / |reference - other|^2); inf when they are equal."""
    import numpy as np

    ref, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    noise = float(((ref - other) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float((ref**2).sum()), 1e-30) / noise)


def same_top1(reference, other) -> bool:
    """Every row's top-1 of `other` is a top-1 of `reference`: where quantized logits tie at the maximum
    (a random init's flat logits do, at 1000 classes on 256 levels), any of the tied classes counts."""
    import numpy as np

    ref, other = np.asarray(reference).reshape(len(reference), -1), np.asarray(other).reshape(len(other), -1)
    picked = ref[np.arange(len(ref)), other.argmax(1)]
    return bool((picked == ref.max(1)).all())


def _inputs(size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, size, size, generator=g)
    calib = [torch.randn(BATCH, 3, size, size, generator=g) for _ in range(CALIB_BATCHES)]
    return example, calib, torch.randn(TEST_BATCH, 3, size, size, generator=g)


def _build(name: str):
    """The model as torchvision builds it, random weights (seeded), eval mode, BatchNorms randomized and
    a zero-initialised head re-drawn (fxquant.tools.zoo.random_model) so its logits have a spread."""
    from fxquant.tools.zoo import random_model

    return random_model(name)


def _compare(row: Row, path: str, reference, floats, test) -> None:
    """ONNX Runtime on `test` against the reference model's output; the reference against the float one."""
    from fxquant.check import ort_session, run_onnx

    got = run_onnx(ort_session(path, threads=1), test)
    row.ort_ran = True
    row.sqnr_onnx_db = sqnr_db(reference, got)
    row.sqnr_int8_db = sqnr_db(floats, reference)
    row.top1_same = same_top1(reference, got)
    row.float_std = float(floats.std())


def run_fxquant(row: Row, folder: str, sqnr_only: bool = False) -> None:
    """The row; `sqnr_only` stops after "SQNR int8 vs float" (no export, no ONNX Runtime: the same figure, faster)."""
    import torch

    import fxquant
    from fxquant.check import layerwise_steps

    name, size = row.model, row.size
    model = _build(name)
    example, calib, test = _inputs(size)
    trace: list = []
    start = time.perf_counter()
    try:
        qmodel = fxquant.quantize(model, example, progress=False, pass_trace=trace, target=row.target, a_bits=row.a_bits,
                                  gptq=row.gptq)
    finally:
        done = [p for p, _, _ in trace]
        row.traced, row.fused = "trace_model" in done, "fuse_modules" in done
    row.quantize_s = time.perf_counter() - start
    rep = fxquant.report(qmodel)
    row.quantized = f"{len(rep.quantized)}/{len(rep.ops)}"
    row.floats = f"{len(rep.float_by_rule)}+{len(rep.no_rule)}"
    row.leaves = len(rep.leaves)
    start = time.perf_counter()
    fxquant.calibrate(qmodel, calib, progress=False)
    row.calibrate_s = time.perf_counter() - start
    int8 = fxquant.convert(qmodel)
    if sqnr_only:
        with torch.no_grad():
            row.sqnr_int8_db = sqnr_db(model(test).numpy(), int8(test).numpy())
        return
    path = os.path.join(folder, f"{name}.onnx")
    start = time.perf_counter()
    fxquant.export_onnx(int8, path, example)
    row.export_s, row.exported = time.perf_counter() - start, True
    with torch.no_grad():
        reference, floats = int8(test).numpy(), model(test).numpy()
        moved = int8(nudged(test)).numpy()
    row.floor_db, row.floor_top1 = sqnr_db(reference, moved), same_top1(reference, moved)
    _compare(row, path, reference, floats, test)
    row.layer_steps = layerwise_steps(int8, path, test)[0]


def run_torch_ao(row: Row, folder: str) -> None:
    """The same table for torch.ao's FX quantization: the peer baseline (deprecated API, used only here)."""
    import warnings

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    warnings.filterwarnings("ignore")
    name, size = row.model, row.size
    model = _build(name)
    example, calib, test = _inputs(size)
    start = time.perf_counter()
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
    row.quantize_s, row.traced, row.fused = time.perf_counter() - start, True, True
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    reference_model = convert_to_reference_fx(prepared)
    path = os.path.join(folder, f"{name}.onnx")
    start = time.perf_counter()
    torch.onnx.export(reference_model, (example,), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}})  # dynamo=True needs onnxscript
    row.export_s, row.exported = time.perf_counter() - start, True
    with torch.no_grad():
        reference, floats = reference_model(test).numpy(), model(test).numpy()
    _compare(row, path, reference, floats, test)


def _one(name: str, size: int, torch_ao: bool, threads: int, target: str | None = None, sqnr_only: bool = False,
         a_bits: int = 8, gptq: bool = False) -> Row:
    """Run one model in this process; an exception becomes the row's error."""
    import torch

    torch.set_num_threads(threads)
    row = Row(name, size, target, a_bits, gptq)
    with tempfile.TemporaryDirectory(prefix="fxquant-coverage-") as folder:
        try:
            run_torch_ao(row, folder) if torch_ao else run_fxquant(row, folder, sqnr_only)
        except Exception as exc:  # a failure is a row (with the stages it passed), not a crash
            where = traceback.extract_tb(exc.__traceback__)[-1]
            row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]} [{os.path.basename(where.filename)}:{where.lineno}]"
    return row


def _in_subprocess(name: str, size: int, args) -> Row:
    cmd = [sys.executable, "-m", "fxquant.tools.coverage", "--one", name, "--size", str(size), "--threads", str(args.threads)]
    cmd += ["--torch-ao"] if args.torch_ao else []
    target = getattr(args, "target", None)
    cmd += ["--target", target] if target else []
    cmd += ["--sqnr-only"] if getattr(args, "sqnr_only", False) else []
    cmd += ["--a-bits", str(args.a_bits)] if getattr(args, "a_bits", 8) != 8 else []
    cmd += ["--gptq"] if getattr(args, "gptq", False) else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Row(name, size, getattr(args, "target", None), error=f"timed out after {args.timeout} s")
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return Row(**json.loads(line[len(MARKER):]))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return Row(name, size, getattr(args, "target", None), error=f"process exited with {done.returncode}: {tail[:300]}")


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


# ------------------------------------------------------------------ output


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if unit == "g":
            return f"{value:.2g}"
        return "exact" if math.isinf(value) else f"{value:.1f}{unit}" if unit == " dB" else f"{value:.2f}"
    return str(value)


COLUMNS = (("model", "model", ""), ("size", "input", ""), ("traced", "traced", ""), ("fused", "fused", ""),
           ("quantized", "quantized ops", ""), ("floats", "float ops (rule+none)", ""), ("leaves", "leaves", ""),
           ("exported", "exported", ""), ("ort_ran", "ORT ran", ""), ("sqnr_onnx_db", "SQNR ORT vs int8", " dB"),
           ("sqnr_int8_db", "SQNR int8 vs float", " dB"), ("top1_same", "same top-1", ""),
           ("float_std", "float logits std", "g"), ("floor_db", "SQNR int8 vs int8, input nudged", " dB"),
           ("floor_top1", "nudged top-1 same", ""),
           ("layer_steps", "layerwise max steps", "g"),
           ("quantize_s", "quantize s", ""), ("export_s", "export s", ""), ("error", "error", ""))


def markdown(rows: list[Row], *, torch_ao: bool = False) -> str:
    tool = "torch.ao FX (prepare_fx, convert_to_reference_fx, torch.onnx.export)" if torch_ao else "fxquant"
    passed = sum(r.passed for r in rows)
    faithful = sum(r.layer_steps is not None and r.layer_steps <= 1 for r in rows)
    lines = [f"{tool}: {passed} of {len(rows)} models reach ONNX Runtime with SQNR >= {PASS_DB:.0f} dB against the "
             "reference int8 model and the same top-1."]
    if not torch_ao:
        lines.append(f"{faithful} of {len(rows)} agree with the reference within one quantization step at every layer "
                     "(teacher-forced: each layer computed from ONNX Runtime's own inputs).")
        chaotic = [r.model for r in rows if not r.passed and r.floor_db is not None
                   and (r.floor_db < PASS_DB or not r.floor_top1)]
        if chaotic:
            lines.append(f"Misses whose reference int8 model, against itself with its input nudged by {NUDGE:g}, falls "
                         f"under {PASS_DB:.0f} dB or changes its top-1 (its noise floor): {', '.join(chaotic)}.")
    lines += ["",
             "| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(getattr(r, key), unit).replace("|", "\\|") for key, _, unit in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_readme(path: str, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between the markers `begin` and `end` of the file at `path` by `table`."""
    text = open(path).read()
    if begin not in text or end not in text:
        raise SystemExit(f"--readme {path}: add the markers {begin} and {end} where the table goes")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{table}{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxquant.tools.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (default: every torchvision classification model)")
    parser.add_argument("--markdown", help="write the table as Markdown to this file")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--readme", help="rewrite the table between the coverage markers of this README")
    parser.add_argument("--torch-ao", action="store_true", help="run PyTorch's FX quantization instead, for comparison")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (default 1800)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1)")
    parser.add_argument("--size", type=int, help="input size for every model (default: per model, see the docstring)")
    parser.add_argument("--target", help="the onnxruntime backend's deployment target (default: portable; vnni for "
                        "8-bit weights everywhere)")
    parser.add_argument("--update", metavar="JSON", help="start from the rows of an earlier --json run and rerun only "
                        "--models, replacing their rows (after a change that touches some models)")
    parser.add_argument("--sqnr-only", action="store_true", help="fxquant: only the SQNR int8 vs float column "
                        "(no export, no ONNX Runtime)")
    parser.add_argument("--a-bits", type=int, default=8, choices=range(2, 9), metavar="{2..8}",
                        help="fxquant's activation width (default 8)")
    parser.add_argument("--gptq", action="store_true", help="fxquant: round the weights with GPTQ on the calibration "
                        "batches (QuantConfig.gptq)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model here, print its row
    args = parser.parse_args(argv)
    if args.one:
        row = _one(args.one, args.size or input_size(args.one), args.torch_ao, args.threads, args.target, args.sqnr_only, args.a_bits,
                   args.gptq)
        print(MARKER + json.dumps(asdict(row)), flush=True)
        return 0
    names = [m for m in args.models.split(",") if m] if args.models else all_models()
    unknown = sorted(set(names) - set(all_models()))
    if unknown:
        parser.error(f"--models: not torchvision classification models: {unknown}")
    rows = []
    if args.update:
        if not args.models:
            parser.error("--update: name the models to rerun with --models")
        with open(args.update) as f:
            rows = [Row(**{k: v for k, v in d.items() if k != "passed"}) for d in json.load(f)["rows"]]
    rerun = set(names)
    rows = [r for r in rows if r.model not in rerun]
    for name in names:
        rows.append(_in_subprocess(name, args.size or input_size(name), args))
        r = rows[-1]
        status = "pass" if r.passed else f"FAIL {r.error}"
        print(f"{name:24s} {_fmt(r.sqnr_onnx_db, ' dB'):>10s} {_fmt(r.quantize_s):>7s}s {status}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: r.model)
    table = markdown(rows, torch_ao=args.torch_ao)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_ao": args.torch_ao, "rows": [asdict(r) | {"passed": r.passed} for r in rows]}, f, indent=1)
    if args.readme:
        write_readme(args.readme, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
