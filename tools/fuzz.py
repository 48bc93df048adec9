"""A graph fuzzer: random valid networks through quantize -> convert -> export_onnx -> ONNX Runtime.

    python -m fxquant.tools.fuzz [--graphs 1000] [--seed 0] [--json OUT]

A network is a `Spec`: its dimensionality (conv 1-D, 2-D or 3-D), one or two inputs, a list of steps
and an output form. Steps (each a plain tuple, so a failing spec prints as code and becomes a test):
    ("conv", c_out, k, depthwise, functional)   nn.ConvNd, or F.convNd on the model's own parameters
    ("convT", c_out)                            nn.ConvTransposeNd (stride 1, kernel 3: the size stays)
    ("bn", extreme)                             BatchNormNd with random statistics; extreme: "dead" (a channel
                                                with gamma 1e-6, beta 1.5), "wide" (var 1e4) or None
    ("act", name)                               relu, relu6, sigmoid, silu, gelu, hardswish, tanh, leaky_relu
                                                (modules or functions)
    ("add", j) / ("mul", j) / ("cat", j)        with the value j steps back (same shape; cat: same size)
    ("pool", "max" | "avg")                     3x3, stride 1 (2-D)
    ("resize",)                                 nearest x2 then 2x2 average pooling (2-D)
    ("reshape",) / ("permute",)                 flatten and unflatten the spatial dims / swap and swap back
    ("slice", k)                                the first k channels
    ("float", name)                             abs, exp, pow, clamp, where, masked_fill, erf (float ops)
    ("shared", j)                               call the conv of step j again (a module reused)
Outputs: the last value, a tuple (last, an earlier one) or a dict {"out": last, "aux": earlier}.

Each graph is quantized (PTQ, two seeded calibration batches), converted, exported and run in ONNX Runtime
on this CPU. Its verdict (`check`): "ok" when every quantized tensor of the file is within one step of
the reference int8 graph teacher-forced (fxquant.check.layerwise); "refused" when quantize raised an
FxQuantError (documented, before any training); anything else is a failure, by kind: "error at <stage>:
<exception>" or "mismatch" (a layer more than one step off). The same generator draws from a seeded
random.Random here and from hypothesis in tests/test_fuzz.py, where failures shrink to small specs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ACTS = ("relu", "relu6", "sigmoid", "silu", "gelu", "hardswish", "tanh", "leaky_relu")
FLOATS = ("abs", "exp", "pow", "clamp", "where", "masked_fill", "erf")
SIZES = {1: (10,), 2: (6, 6), 3: (3, 4, 4)}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MODULE_ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "gelu": nn.GELU,
               "hardswish": nn.Hardswish, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Spec:
    dims: int
    inputs: int
    steps: tuple
    output: str  # "tensor", "tuple" or "dict"
    seed: int = 0  # the weights and statistics


class Draw:
    """Where choices come from: a seeded random.Random (the tool) or hypothesis (tests/test_fuzz.py)."""

    def __init__(self, rng: random.Random | None = None, data=None):
        self.rng, self.data = rng, data

    def pick(self, options):
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.sampled_from(list(options)))
        return self.rng.choice(list(options))

    def integer(self, lo: int, hi: int) -> int:
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.integers(lo, hi))
        return self.rng.randint(lo, hi)


def draw_spec(d: Draw, max_steps: int = 6) -> Spec:
    """A random valid network: shapes are tracked so every step is legal where it is drawn."""
    dims, inputs = d.pick((2, 2, 1, 3)), d.integer(1, 2)
    shapes = [4] * inputs  # channels of each value so far (every value keeps the spatial size)
    convs = []  # steps that are convs with c_in == c_out (reusable)
    steps = []
    for _ in range(d.integer(1, max_steps)):
        c = shapes[-1]
        kind = d.pick(("conv", "conv", "bn", "act", "add", "mul", "cat", "pool", "resize", "reshape", "permute",
                       "slice", "float", "shared", "convT"))
        same = [j for j in range(1, len(shapes)) if shapes[-1 - j] == c]
        if kind == "conv":
            depthwise = d.pick((False, True))
            c_out = c if depthwise else d.pick((4, 6, 8))
            step = ("conv", c_out, d.pick((1, 3)), depthwise, d.pick((False, True)))
            if c_out == c and not step[4]:
                convs.append(len(steps))
            c = c_out
        elif kind == "convT":
            c = d.pick((4, 6))
            step = ("convT", c)
        elif kind == "bn":
            step = ("bn", d.pick((None, None, "dead", "wide")))
        elif kind == "act":
            step = ("act", d.pick(ACTS))
        elif kind in ("add", "mul"):
            if not same:
                continue
            step = (kind, d.pick(same))
        elif kind == "cat":
            j = d.integer(1, len(shapes) - 1) if len(shapes) > 1 else 0
            if not j:
                continue
            step, c = ("cat", j), c + shapes[-1 - j]
        elif kind in ("pool", "resize"):
            if dims != 2:
                continue
            step = ("pool", d.pick(("max", "avg"))) if kind == "pool" else ("resize",)
        elif kind == "slice":
            if c < 2:
                continue
            step = ("slice", d.integer(1, c - 1))
            c = step[1]
        elif kind == "float":
            step = ("float", d.pick(FLOATS))
        elif kind == "shared":
            usable = [j for j in convs if steps[j][1] == c and _conv_input_channels(steps, j, inputs) == c]
            if not usable:
                continue
            step = ("shared", d.pick(usable))
        else:
            step = (kind,)
        steps.append(step)
        shapes.append(c)
    return Spec(dims, inputs, tuple(steps), d.pick(("tensor", "tuple", "dict")), d.integer(0, 2**16))


def _conv_input_channels(steps, j: int, inputs: int) -> int:
    return channels(steps[:j], inputs)[-1]


def channels(steps, inputs: int) -> list[int]:
    """The channels of every value: the inputs' stems (4 each), then one per step."""
    shapes = [4] * inputs
    for step in steps:
        c = shapes[-1]
        if step[0] in ("conv", "convT"):
            c = step[1]
        elif step[0] == "cat":
            c = c + shapes[-1 - step[1]]
        elif step[0] == "slice":
            c = step[1]
        shapes.append(c)
    return shapes


class Holder(nn.Module):
    """Parameters a functional conv reads (the model's own tensors)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)


class Net(nn.Module):
    """The network of a Spec (see the module docstring)."""

    def __init__(self, spec: Spec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec, n = spec, spec.dims
        self.stems = nn.ModuleList(CONV[n](3, 4, 3, padding=1) for _ in range(spec.inputs))
        self.layers = nn.ModuleDict()
        shapes = channels(spec.steps, spec.inputs)
        for i, step in enumerate(spec.steps):
            c = shapes[spec.inputs + i - 1]
            if step[0] == "conv":
                _, c_out, k, depthwise, functional = step
                conv = CONV[n](c, c_out, k, padding=k // 2, groups=c if depthwise else 1)
                self.layers[str(i)] = Holder(conv.weight.data, conv.bias.data) if functional else conv
            elif step[0] == "convT":
                self.layers[str(i)] = CONV_T[n](c, step[1], 3, padding=1)
            elif step[0] == "bn":
                self.layers[str(i)] = _batchnorm(BN[n](c), step[1])
            elif step[0] == "act" and step[1] in MODULE_ACTS and i % 2:
                self.layers[str(i)] = MODULE_ACTS[step[1]]()

    def forward(self, x):
        return self._run([self.stems[0](x)])

    def _run(self, values):
        for i, step in enumerate(self.spec.steps):
            values.append(self._step(str(i), step, values))
        out, aux = values[-1], values[len(values) // 2]
        if self.spec.output == "tuple":
            return out, aux
        if self.spec.output == "dict":
            return {"out": out, "aux": aux}
        return out

    def _step(self, i: str, step, values):
        y, kind, n = values[-1], step[0], self.spec.dims
        if kind == "conv" and step[4]:
            holder = self.layers[i]
            return CONV_F[n](y, holder.weight, holder.bias, padding=step[2] // 2, groups=y.shape[1] if step[3] else 1)
        if kind in ("conv", "convT", "bn") or (kind == "act" and i in self.layers):
            return self.layers[i](y)
        if kind == "act":
            return F.leaky_relu(y, 0.1) if step[1] == "leaky_relu" else getattr(F, step[1])(y)
        if kind == "add":
            return y + values[-1 - step[1]]
        if kind == "mul":
            return y * values[-1 - step[1]]
        if kind == "cat":
            return torch.cat([y, values[-1 - step[1]]], 1)
        if kind == "pool":
            return F.max_pool2d(y, 3, 1, 1) if step[1] == "max" else F.avg_pool2d(y, 3, 1, 1)
        if kind == "resize":
            return F.avg_pool2d(F.interpolate(y, scale_factor=2.0, mode="nearest"), 2)
        if kind == "reshape":
            return y.flatten(2).unflatten(2, SIZES[n])
        if kind == "permute":
            return y.transpose(1, -1).transpose(1, -1)
        if kind == "slice":
            return y[:, : step[1]]
        if kind == "float":
            return _float_op(step[1], y)
        if kind == "shared":
            return self.layers[str(step[1])](y)
        raise ValueError(f"unknown step {step!r}")


class Net2(Net):
    """A Spec with two inputs: forward(x, x2), each through its own stem."""

    def forward(self, x, x2):
        return self._run([self.stems[0](x), self.stems[1](x2)])


def build(spec: Spec) -> Net:
    return (Net2 if spec.inputs == 2 else Net)(spec)


def _float_op(name: str, y):
    if name == "abs":
        return y.abs()
    if name == "exp":
        return torch.exp(-y.abs())
    if name == "pow":
        return y.pow(2)
    if name == "clamp":
        return y.clamp(-1.0, 1.0)
    if name == "where":
        return torch.where(y > 0, y, 0.1 * y)
    if name == "masked_fill":
        return y.masked_fill(y < -1.0, 0.0)
    return torch.erf(y)


@torch.no_grad()
def _batchnorm(bn, extreme):
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
    if extreme == "dead":
        bn.weight[0], bn.bias[0] = 1e-6, 1.5
    elif extreme == "wide":
        bn.running_var[0] = 1e4
    return bn


def inputs_of(spec: Spec, batch: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, 3, *SIZES[spec.dims], generator=g) for _ in range(spec.inputs))


@dataclass
class Verdict:
    kind: str  # "ok", "refused", "mismatch" or "error at <stage>: <exception type>"
    detail: str = ""
    steps: float = 0.0
    spec: Spec | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.kind not in ("ok", "refused")


def check(spec: Spec, folder: str | None = None) -> Verdict:
    """Quantize, convert, export and run `spec` in ONNX Runtime; the verdict (see the module docstring)."""
    import fxquant
    from fxquant.check import layerwise

    model = build(spec).eval()
    calib = [inputs_of(spec, 4, 1), inputs_of(spec, 4, 2)]
    stage = "quantize"
    with tempfile.TemporaryDirectory() if folder is None else _nothing(folder) as where, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                qmodel = fxquant.quantize(model, calib_data=calib, progress=False)
            except fxquant.FxQuantError as exc:
                return Verdict("refused", str(exc).splitlines()[0][:200], spec=spec)
            stage = "convert"
            int8 = fxquant.convert(qmodel)
            stage = "export_onnx"
            path = os.path.join(where, "fuzz.onnx")
            fxquant.export_onnx(qmodel, path)
            stage = "onnxruntime"
            found = layerwise(int8, path, inputs_of(spec, 3, 3))
        except Exception as exc:
            return Verdict(f"error at {stage}: {type(exc).__name__}", str(exc).splitlines()[0][:200] if str(exc) else "", spec=spec)
    if found.max_steps > 1:
        return Verdict("mismatch", f"{found.worst} {found.max_steps:g} steps", found.max_steps, spec)
    return Verdict("ok", steps=found.max_steps, spec=spec)


class _nothing:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def run(graphs: int, seed: int = 0, progress: bool = False) -> list[Verdict]:
    rng = random.Random(seed)
    verdicts = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(graphs):
            verdict = check(draw_spec(Draw(rng)), folder)
            verdicts.append(verdict)
            if progress and verdict.failed:
                print(f"graph {i}: {verdict.kind}: {verdict.detail}\n  {verdict.spec}", flush=True)
    return verdicts


def summary(verdicts: list[Verdict]) -> str:
    kinds = Counter(v.kind for v in verdicts)
    failures = {k: n for k, n in kinds.items() if k not in ("ok", "refused")}
    lines = [f"graphs tried: {len(verdicts)}", f"ok (every layer within one step): {kinds['ok']}",
             f"refused by quantize (FxQuantError): {kinds['refused']}",
             f"failures: {sum(failures.values())}", f"mismatches (> 1 step): {kinds['mismatch']}"]
    lines += [f"  {k}: {n}" for k, n in sorted(failures.items(), key=lambda kn: -kn[1])]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write each failing spec and its verdict here")
    parser.add_argument("--progress", action="store_true", help="print each failure as it happens")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    verdicts = run(args.graphs, args.seed, args.progress)
    print(summary(verdicts))
    print(f"({time.perf_counter() - start:.0f} s, seed {args.seed}, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"kind": v.kind, "detail": v.detail, "spec": repr(v.spec)} for v in verdicts if v.failed], f, indent=1)


if __name__ == "__main__":
    main()
