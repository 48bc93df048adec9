"""Deployment benchmark: fxquant's QDQ file against float and against ONNX Runtime's own quantizer.

    python -m fxquant.tools.bench_deploy [--models resnet18,...] [--batches 1,8] [--size 224]
                                         [--iters 20] [--threads 1] [--json OUT] [--keep DIR] [--quick]

For each torchvision model (random init, BatchNorm statistics randomized so activations do not
vanish; nothing is downloaded) three files are written from one float model and one set of random
calibration batches:
    float      fxquant.export_onnx of the float model with BatchNorm folded into its convs (what a
               deployer ships: ONNX Runtime folds it anyway; an unfolded file would be bigger
               and flatter every size ratio)
    ort        onnxruntime.quantization: quant_pre_process + quantize_static(QDQ), calibrated on the
               same batches, once with its defaults (S8S8, per-tensor: `ort_default`) and once with
               the settings its docs give for x86-64 (U8S8, per-channel: `ort_u8s8`)
    fxquant    fxquant.quantize(model, calib_data=batches) -> export_onnx  (backend onnxruntime, its
               default target "portable": 7-bit weights on the integer GEMMs, exact on every x86 CPU)
    fxquant_vnni  the same with target="vnni": 8-bit weights everywhere (exact only on VNNI CPUs); the
               portable file must match its optimised op counts and be no slower
    fxquant_copy  a byte-identical copy of the fxquant file, timed as one more variant: the A/A control,
               the spread that noise alone gives two files of the same kernels
and measured on the CPU execution provider:
    fused      Conv/Gemm/MatMul nodes that became integer kernels (QLinearConv, QGemm, QLinearMatMul,
               MatMulInteger...) in ONNX Runtime's optimised graph (level ENABLE_EXTENDED)
    latency    ENABLE_ALL sessions, the variants run interleaved (one run of each per round, each round
               starting one variant later), each reported as the median over rounds of its time divided
               by float's time in that round; "fxquant faster than X" needs fxquant to win so many of
               the paired rounds that two equally fast files would do so with probability < 0.05 (a
               one-sided sign test); "portable no slower than vnni" fails only where vnni wins with
               p < 0.05 / rows (Bonferroni: with six rows of identical kernels, an uncorrected 0.05 on
               each would cry "slower" in one run of four)
    ops        the optimised graph's op types and counts, per variant (in the JSON; the report says
               where fxquant's and ORT U8S8's are the same)
    size       file bytes, as a fraction of the float file
The report starts with the CPU's integer-kernel ISA (fxquant.check.host_isa): ONNX Runtime picks its
kernels by it, so ratios from an AVX2 CPU and a VNNI CPU differ. `--quick` (resnet18, batch 1, 112x112,
3 rounds) is what the smoke test runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from fxquant.tools.zoo import random_model

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
VARIANTS = ("float", "ort_default", "ort_u8s8", "fxquant", "fxquant_vnni", "fxquant_copy")
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
               "DynamicQuantizeMatMul"}
FLOAT_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
CALIB_BATCHES, CALIB_BATCH = 4, 2
TARGET_SPEEDUP, TARGET_SIZE = 0.8, 0.27  # int8 <= 0.8x float latency on resnet18 batch 1; file <= 0.27x float
TARGET_SPEEDUP_AVX2 = 0.6  # ... and <= 0.6x on a CPU without VNNI (the portable file's 7-bit GEMMs run at full speed)
SIGNIFICANCE = 0.05  # "faster": a tie would win as many paired rounds less often than this


@dataclass
class Result:
    model: str
    batch: int
    size: int
    fused: dict = field(default_factory=dict)  # variant -> fraction of Conv/Gemm/MatMul fused (None: float)
    latency_ms: dict = field(default_factory=dict)  # variant -> median ms
    ratio: dict = field(default_factory=dict)  # variant -> median of (variant ms / float ms) per round
    file_ratio: dict = field(default_factory=dict)  # variant -> bytes / float bytes
    p_tie: dict = field(default_factory=dict)  # variant -> sign-test p of fxquant's paired wins against it (None: too few rounds)
    p_vnni_faster: float | None = None  # sign-test p of the 8-bit (vnni) file's paired wins against the portable one
    ops: dict = field(default_factory=dict)  # variant -> {op type: count} in ORT's optimised graph (ENABLE_EXTENDED)


# ------------------------------------------------------------------ building the files


_model = random_model  # torchvision model, random init, BatchNorm statistics randomized (fxquant.tools.zoo)


def _ort_quantize(float_path: str, out_path: str, calib, *, recommended: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.batches, None)

    pre = out_path + ".pre.onnx"
    quant_pre_process(float_path, pre)
    options = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True) if recommended else {}
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, **options)
    os.unlink(pre)


def build_files(name: str, size: int, folder: str) -> dict[str, str]:
    """The ONNX files of one model, by variant (VARIANTS)."""
    import fxquant
    from fxquant.api import copy_model
    from fxquant.passes import fuse_modules, trace_model

    model = _model(name)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(CALIB_BATCH, 3, size, size, generator=g) for _ in range(CALIB_BATCHES)]
    example = calib[0][:1]
    paths = {v: os.path.join(folder, f"{name}_{v}.onnx") for v in VARIANTS}
    folded = fuse_modules(trace_model(copy_model(model), example_inputs=(example,)))  # BN in the conv
    fxquant.export_onnx(folded, paths["float"], example)
    _ort_quantize(paths["float"], paths["ort_default"], calib, recommended=False)
    _ort_quantize(paths["float"], paths["ort_u8s8"], calib, recommended=True)
    for variant, target in (("fxquant", None), ("fxquant_vnni", "vnni")):
        qmodel = fxquant.quantize(model, example, calib_data=calib, target=target, progress=False)
        fxquant.export_onnx(qmodel, paths[variant], example)
    shutil.copyfile(paths["fxquant"], paths["fxquant_copy"])  # the A/A control: what noise alone makes of one file
    return paths


# ------------------------------------------------------------------ measuring


def optimized_ops(path: str, folder: str) -> dict[str, int]:
    """{op type: count} of ORT's optimised graph (level ENABLE_EXTENDED, where the QDQ fusions run)."""
    from fxquant.check import ort_session

    optimized = os.path.join(folder, os.path.basename(path) + ".opt.onnx")
    ort_session(path, optimized_path=optimized, level="extended")
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    os.unlink(optimized)
    return {o: ops.count(o) for o in sorted(set(ops))}


def fused_fraction(ops: dict[str, int]) -> float | None:
    """Integer Conv/Gemm/MatMul kernels / all of them, in an optimised graph's op counts; None when there are none."""
    integer = sum(n for o, n in ops.items() if o in INTEGER_OPS)
    floating = sum(n for o, n in ops.items() if o in FLOAT_OPS)
    return integer / (integer + floating) if integer + floating else None


def sign_test(wins: int, rounds: int) -> float | None:
    """P(at least `wins` of `rounds` paired rounds won) when both are equally fast; None when even winning every
    round could not reach SIGNIFICANCE (too few rounds to tell)."""
    if 0.5**rounds >= SIGNIFICANCE:
        return None
    return sum(math.comb(rounds, k) for k in range(wins, rounds + 1)) / 2**rounds


def latencies(paths: dict[str, str], x: np.ndarray, *, rounds: int, threads: int) -> tuple[dict, dict, dict, float | None]:
    """(median ms, median ratio to float, sign-test p of fxquant's wins) per variant, from interleaved rounds,
    and the sign-test p of the 8-bit (vnni) file's wins against fxquant's portable one."""
    from fxquant.check import ort_session

    sessions = {v: ort_session(p, threads=threads, level="all") for v, p in paths.items()}
    feeds = {v: {s.get_inputs()[0].name: x} for v, s in sessions.items()}
    for v, s in sessions.items():  # warm-up: allocations, kernel selection
        s.run(None, feeds[v])
    times = {v: [] for v in sessions}
    order = list(sessions)
    for i in range(rounds):  # each round starts one variant later, so no file always runs right after another
        for v in order[i % len(order):] + order[:i % len(order)]:
            s = sessions[v]
            start = time.perf_counter()
            s.run(None, feeds[v])
            times[v].append(time.perf_counter() - start)
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    ratio = {v: statistics.median(a / b for a, b in zip(t, times["float"])) for v, t in times.items()}
    p_tie = {v: sign_test(sum(a < b for a, b in zip(times["fxquant"], t)), rounds) for v, t in times.items()}
    vnni = times.get("fxquant_vnni")
    p_vnni = None if vnni is None else sign_test(sum(a < b for a, b in zip(vnni, times["fxquant"])), rounds)
    return ms, ratio, p_tie, p_vnni


def bench_model(name: str, batches, *, size: int, rounds: int, threads: int, folder: str) -> list[Result]:
    paths = build_files(name, size, folder)
    ops = {v: optimized_ops(p, folder) for v, p in paths.items()}
    fused = {v: fused_fraction(o) for v, o in ops.items()}
    sizes = {v: os.path.getsize(p) / os.path.getsize(paths["float"]) for v, p in paths.items()}
    results = []
    for batch in batches:
        x = np.random.default_rng(3).standard_normal((batch, 3, size, size), dtype=np.float32)
        ms, ratio, p_tie, p_vnni = latencies(paths, x, rounds=rounds, threads=threads)
        results.append(Result(name, batch, size, fused, ms, ratio, sizes, p_tie, p_vnni, ops))
    return results


# ------------------------------------------------------------------ reporting


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(results: list[Result]) -> str:
    head = ("| model | batch | fused fxquant | fused ORT default | fused ORT u8s8 | float ms | fxquant x float "
            "| fxquant 8-bit (vnni) x float | same fxquant file again x float (A/A) | ORT default x float | ORT u8s8 x float | fxquant size x float | ORT u8s8 size x float |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r.model} | {r.batch} | {_pct(r.fused['fxquant'])} | {_pct(r.fused['ort_default'])} | {_pct(r.fused['ort_u8s8'])} "
            f"| {r.latency_ms['float']:.1f} | {r.ratio['fxquant']:.2f} | {r.ratio['fxquant_vnni']:.2f} | {r.ratio['fxquant_copy']:.2f} "
            f"| {r.ratio['ort_default']:.2f} | {r.ratio['ort_u8s8']:.2f} "
            f"| {r.file_ratio['fxquant']:.3f} | {r.file_ratio['ort_u8s8']:.3f} |"
        )
    return "\n".join(lines)


def targets(results: list[Result], isa: str | None = None) -> dict[str, bool | None]:
    """Each target: True met, False missed, None not measured in this run (`isa`: the CPU's, host_isa())."""
    r18 = [r for r in results if r.model == "resnet18" and r.batch == 1]
    without_vnni = isa is not None and isa.startswith(("AVX2", "AVX-512 (no VNNI)", "SSE"))
    p_vnni = [r.p_vnni_faster for r in results]
    return {
        "portable file: same optimised op counts as the 8-bit vnni file (every model)":
            all(r.ops.get("fxquant") == r.ops.get("fxquant_vnni") for r in results),
        f"portable file no slower than the 8-bit vnni file (no row where vnni wins the paired rounds with p < "
        f"{SIGNIFICANCE} / rows, Bonferroni)":
            None if None in p_vnni else all(p >= SIGNIFICANCE / len(p_vnni) for p in p_vnni),
        f"int8 <= {TARGET_SPEEDUP_AVX2}x float latency on a CPU without VNNI (resnet18, batch 1)":
            r18[0].ratio["fxquant"] <= TARGET_SPEEDUP_AVX2 if r18 and without_vnni else None,
        "100% of Conv/Gemm/MatMul fused (fxquant, every model)": all(r.fused["fxquant"] == 1.0 for r in results),
        f"fxquant faster than ORT quantize_static defaults (every row, sign test p < {SIGNIFICANCE})": _faster(results, "ort_default"),
        f"fxquant faster than ORT quantize_static U8S8 per-channel (every row, sign test p < {SIGNIFICANCE})": _faster(results, "ort_u8s8"),
        f"int8 <= {TARGET_SPEEDUP}x float latency (resnet18, batch 1)": r18[0].ratio["fxquant"] <= TARGET_SPEEDUP if r18 else None,
        f"file size <= {TARGET_SIZE}x float (every model)": all(r.file_ratio["fxquant"] <= TARGET_SIZE for r in results),
    }


def _faster(results: list[Result], variant: str) -> bool | None:
    p = [r.p_tie[variant] for r in results]
    return None if None in p else all(v < SIGNIFICANCE for v in p)


def same_graphs(results: list[Result]) -> list[str]:
    """Models whose fxquant and ORT U8S8 optimised graphs hold the same op types, each as often."""
    return sorted({r.model for r in results if r.ops["fxquant"] == r.ops["ort_u8s8"]})


def _report(results: list[Result], isa: str) -> str:
    import onnxruntime

    marks = {True: "met", False: "NOT met", None: "not measured"}
    lines = [f"- {k}: {marks[v]}" for k, v in targets(results, isa).items()]
    same = same_graphs(results)
    if same:
        lines.append(f"- same optimised op counts as ORT U8S8 (expect a latency tie): {', '.join(same)}")
    head = f"CPU: {isa} (integer kernels), ONNX Runtime {onnxruntime.__version__}\n\n"
    return head + markdown(results) + "\n\n" + "\n".join(lines)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fxquant.tools.bench_deploy", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--iters", type=int, default=20, help="interleaved timing rounds per batch size")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--json", help="write the results and targets here")
    p.add_argument("--keep", help="write the ONNX files into this folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="resnet18, batch 1, 112x112, 3 rounds: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.size, args.iters = "resnet18", "1", 112, 3
    import torchvision

    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if not callable(getattr(torchvision.models, m, None))]
    if unknown or not args.models:
        p.error(f"--models: {unknown or 'none given'} are not torchvision.models constructors (e.g. {','.join(MODELS)})")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1 or args.iters < 1 or args.size < 32:
        p.error("--batches: positive integers, --iters >= 1, --size >= 32")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    models, batches = args.models, args.batches
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        for name in models:
            print(f"[bench_deploy] {name} ...", file=sys.stderr, flush=True)
            results += bench_model(name, batches, size=args.size, rounds=args.iters, threads=args.threads, folder=folder)
    from fxquant.check import host_isa

    isa = host_isa()
    print(_report(results, isa))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [asdict(r) for r in results], "targets": targets(results, isa), "cpu_isa": isa,
                       "settings": {"size": args.size, "iters": args.iters, "threads": args.threads}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
