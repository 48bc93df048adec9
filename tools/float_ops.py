"""Float ops between quantized layers: does fxquant export every op torch.onnx exports?

    python -m fxquant.tools.float_ops [--limit N] [--json OUT] [--names abs,pow,...]

The op list is found, not written: every public callable of `torch`, `torch.nn.functional` and
`torch.Tensor` (no in-place `_` forms, nothing random) that accepts one of the call forms below on a
float (2, 4, 6, 6) tensor and returns a tensor; the first form that works is the op's. Each op then
sits in a model between two quantized convs:

    y = op(sigmoid(conv1(x)) * 0.5 + 0.25);  out = conv2(y) if y is a float tensor of y's input shape, else y

(sigmoid, mul and add, all quantized, put the op's input in (0.25, 0.75), where log, sqrt, acos, logit and
the like are defined; an op that still makes NaN or Inf there fails fxquant's calibration, by design.)

and runs two ways, each against torch on the same inputs (a batch of 3, not the example's 2):
    torch.onnx   torch.onnx.export(float model, dynamo=False, opset 17) in ONNX Runtime vs the float model
    fxquant      quantize (PTQ) -> convert -> export_onnx in ONNX Runtime vs the reference int8 model
"matches" is within 1e-3 relative (and 1e-5 absolute) of the largest |value| (float outputs; one output
quantization step where the output is quantized, and NaN where torch has NaN) or equal (integer and bool
outputs). The report counts ops that export and match for each, and lists every op that fxquant fails
while torch.onnx passes (what fxquant would have to fix). Runs in this process, one op after another.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (2, 4, 6, 6)
RANDOM = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "shuffle", "random", "exponential",
          "geometric", "cauchy", "log_normal", "uniform", "empty", "alpha_dropout", "gumbel")
# call forms tried in order: op(y, *extra) (or y.op(*extra))
FORMS = ((), (1,), ("y",), (0.5,), ("y", "y"), (-1,))


@dataclass
class Row:
    name: str  # torch.abs, F.gelu, Tensor.sum
    form: str  # the call, e.g. "op(y, 1)"
    torch_onnx: str  # "ok" or why not
    fxquant: str


def _args(form, y):
    return tuple(y if a == "y" else a for a in form)


def _call(kind: str, fn, form):
    """y -> fn(y, *form) for a function, y.fn(*form) for a Tensor method (fx traces both)."""
    if kind == "Tensor":
        return lambda y: getattr(y, fn)(*_args(form, y))
    return lambda y: fn(y, *_args(form, y))


def _candidates():
    """(name, kind, fn) of every public callable worth trying, sorted and without duplicates."""
    seen, found = set(), []
    for kind, space in (("torch", torch), ("F", F), ("Tensor", torch.Tensor)):
        for name in sorted(dir(space)):
            if name.startswith("_") or name.endswith("_") or any(r in name for r in RANDOM):
                continue
            fn = getattr(space, name, None)
            if not callable(fn) or isinstance(fn, type):
                continue
            key = name if kind != "F" else f"F.{name}"
            if key in seen:
                continue
            seen.add(key)
            found.append((f"{kind}.{name}", kind, name if kind == "Tensor" else fn))
    return found


def find_ops(limit: int | None = None, names=None) -> list[tuple[str, object, str]]:
    """(name, call y -> result, form) of each candidate that runs on a float tensor and returns a tensor."""
    y = torch.rand(SHAPE) * 0.5 + 0.25
    ops = []
    for name, kind, fn in _candidates():
        if names and name.split(".")[-1] not in names and name not in names:
            continue
        for form in FORMS:
            call = _call(kind, fn, form)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = call(y.clone())
            except Exception:
                continue
            if isinstance(out, torch.Tensor) and out.dtype in (torch.float32, torch.bool, torch.int64, torch.int32) and out.numel():
                ops.append((name, call, "op(y" + "".join(f", {a}" for a in form) + ")"))
                break
        if limit and len(ops) >= limit:
            break
    return ops


class Between(nn.Module):
    """conv1 -> sigmoid * 0.5 + 0.25 -> op -> conv2 (when the op keeps a float tensor of its input's shape)."""

    def __init__(self, op, keeps_shape: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.op, self.keeps_shape = op, keeps_shape

    def forward(self, x):
        y = self.op(torch.sigmoid(self.conv1(x)) * 0.5 + 0.25)
        return self.conv2(y) if self.keeps_shape else y


def _matches(ref: torch.Tensor, got: np.ndarray, step: float | None) -> bool:
    ref = ref.detach().numpy()
    if got.shape != ref.shape:
        return False
    if ref.dtype.kind != "f":
        return bool(np.array_equal(ref, got))
    if not np.array_equal(np.isnan(ref), np.isnan(got)):
        return False
    ref, got = np.nan_to_num(ref, nan=0.0), np.nan_to_num(got, nan=0.0)
    if step is not None:
        return bool(np.abs(ref - got).max() <= step * (1 + 1e-4))
    scale = float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 0.0
    finite = np.isfinite(ref)
    return bool(np.array_equal(ref[~finite], got[~finite]) and np.abs(ref[finite] - got[finite]).max(initial=0.0) <= 1e-3 * scale + 1e-5)


def _ort(path_or_bytes, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"


def _torch_onnx(model, x_example, x) -> str:
    try:
        f = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x_example,), f, dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
        got = _ort(f.getvalue(), x)
    except Exception as exc:
        return "fails: " + _short(exc)
    with torch.no_grad():
        return "ok" if _matches(model(x), got, None) else "mismatch"


def _fxquant(model, x_example, x, folder: str) -> str:
    import fxquant
    from fxquant.check import output_scale

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = fxquant.quantize(model, calib_data=[x_example, x], progress=False)
            int8 = fxquant.convert(qmodel)
            path = os.path.join(folder, "op.onnx")
            fxquant.export_onnx(qmodel, path, x_example)
            got = _ort(path, x)
    except Exception as exc:
        return "fails: " + _short(exc)
    with torch.no_grad():
        return "ok" if _matches(int8(x), got, output_scale(int8)) else "mismatch"


def run(limit: int | None = None, names=None, progress: bool = False) -> list[Row]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_example, x = torch.randn(2, 3, 6, 6, generator=g), torch.randn(3, 3, 6, 6, generator=g)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, call, form in find_ops(limit, names):
            probe = call(torch.rand(SHAPE) * 0.5 + 0.25)
            model = Between(call, probe.dtype == torch.float32 and tuple(probe.shape) == SHAPE).eval()
            row = Row(name, form, _torch_onnx(model, x_example, x), _fxquant(model, x_example, x, folder))
            if progress:
                print(f"{row.name:<32} {row.form:<16} torch.onnx {row.torch_onnx[:40]:<40} fxquant {row.fxquant[:60]}", flush=True)
            rows.append(row)
    return rows


def summary(rows: list[Row]) -> str:
    n = len(rows)
    onnx_ok = sum(r.torch_onnx == "ok" for r in rows)
    fxq_ok = sum(r.fxquant == "ok" for r in rows)
    both = sum(r.torch_onnx == "ok" and r.fxquant == "ok" for r in rows)
    lines = [f"ops tried: {n}", f"torch.onnx exports and matches torch: {onnx_ok} ({100 * onnx_ok / max(n, 1):.1f}%)",
             f"fxquant exports and matches its int8 reference: {fxq_ok} ({100 * fxq_ok / max(n, 1):.1f}%)",
             f"of torch.onnx's {onnx_ok}, fxquant also: {both}"]
    lost = [r for r in rows if r.torch_onnx == "ok" and r.fxquant != "ok"]
    if lost:
        lines.append("torch.onnx ok, fxquant not:")
        lines += [f"  {r.name:<32} {r.form:<16} {r.fxquant}" for r in lost]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="stop after this many ops")
    parser.add_argument("--names", default=None, help="comma-separated op names (abs,pow,F.gelu)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args.limit, args.names.split(",") if args.names else None, args.progress)
    print(summary(rows))
    print(f"({time.perf_counter() - start:.0f} s, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
