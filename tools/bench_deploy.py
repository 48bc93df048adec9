"""Deployment benchmark: fxquant's QDQ file against float and against ONNX Runtime's own quantizer.

    python -m fxquant.tools.bench_deploy [--models resnet18,...] [--batches 1,8] [--size 224]
                                         [--iters 20] [--threads 1] [--json OUT] [--keep DIR] [--quick]

For each torchvision model (random init, BatchNorm statistics randomized so activations do not
vanish; nothing is downloaded) three files are written from one float model and one set of random
calibration batches:
    float      fxquant.export_onnx(model)                               (the nn.Module, not quantized)
    ort        onnxruntime.quantization: quant_pre_process + quantize_static(QDQ), calibrated on the
               same batches, once with its defaults (S8S8, per-tensor: `ort_default`) and once with
               the settings its docs give for x86-64 (U8S8, per-channel: `ort_u8s8`)
    fxquant    fxquant.quantize(model, calib_data=batches) -> export_onnx  (backend onnxruntime)
and measured on the CPU execution provider:
    fused      Conv/Gemm/MatMul nodes that became integer kernels (QLinearConv, QGemm, QLinearMatMul,
               MatMulInteger...) in ONNX Runtime's optimised graph (level ENABLE_EXTENDED)
    latency    ENABLE_ALL sessions, the variants run interleaved (one run of each per round), each
               reported as the median over rounds of its time divided by float's time in that round
    size       file bytes, as a fraction of the float file
`--quick` (resnet18, batch 1, 112x112, 3 rounds) is what the smoke test runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
VARIANTS = ("float", "ort_default", "ort_u8s8", "fxquant")
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
               "DynamicQuantizeMatMul"}
FLOAT_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
CALIB_BATCHES, CALIB_BATCH = 4, 2
TARGET_SPEEDUP, TARGET_SIZE = 0.8, 0.27  # int8 <= 0.8x float latency on resnet18 batch 1; file <= 0.27x float


@dataclass
class Result:
    model: str
    batch: int
    size: int
    fused: dict = field(default_factory=dict)  # variant -> fraction of Conv/Gemm/MatMul fused (None: float)
    latency_ms: dict = field(default_factory=dict)  # variant -> median ms
    ratio: dict = field(default_factory=dict)  # variant -> median of (variant ms / float ms) per round
    file_ratio: dict = field(default_factory=dict)  # variant -> bytes / float bytes


# ------------------------------------------------------------------ building the files


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # default BN statistics make EfficientNet's activations vanish (~1e-13)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model


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
    """The four ONNX files of one model, by variant."""
    import fxquant

    model = _model(name)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(CALIB_BATCH, 3, size, size, generator=g) for _ in range(CALIB_BATCHES)]
    example = calib[0][:1]
    paths = {v: os.path.join(folder, f"{name}_{v}.onnx") for v in VARIANTS}
    fxquant.export_onnx(model, paths["float"], example)
    _ort_quantize(paths["float"], paths["ort_default"], calib, recommended=False)
    _ort_quantize(paths["float"], paths["ort_u8s8"], calib, recommended=True)
    qmodel = fxquant.quantize(model, example, calib_data=calib, progress=False)
    fxquant.export_onnx(qmodel, paths["fxquant"], example)
    return paths


# ------------------------------------------------------------------ measuring


def fused_fraction(path: str, folder: str) -> float | None:
    """Integer Conv/Gemm/MatMul kernels / all of them, in ORT's optimised graph; None when there are none."""
    from fxquant.check import ort_session

    optimized = os.path.join(folder, os.path.basename(path) + ".opt.onnx")
    ort_session(path, optimized_path=optimized, level="extended")
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    os.unlink(optimized)
    integer, floating = sum(o in INTEGER_OPS for o in ops), sum(o in FLOAT_OPS for o in ops)
    return integer / (integer + floating) if integer + floating else None


def latencies(paths: dict[str, str], x: np.ndarray, *, rounds: int, threads: int) -> tuple[dict, dict]:
    """(median ms, median ratio to float) per variant, from interleaved rounds."""
    from fxquant.check import ort_session

    sessions = {v: ort_session(p, threads=threads, level="all") for v, p in paths.items()}
    feeds = {v: {s.get_inputs()[0].name: x} for v, s in sessions.items()}
    for v, s in sessions.items():  # warm-up: allocations, kernel selection
        s.run(None, feeds[v])
    times = {v: [] for v in sessions}
    for _ in range(rounds):
        for v, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[v])
            times[v].append(time.perf_counter() - start)
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    ratio = {v: statistics.median(a / b for a, b in zip(t, times["float"])) for v, t in times.items()}
    return ms, ratio


def bench_model(name: str, batches, *, size: int, rounds: int, threads: int, folder: str) -> list[Result]:
    paths = build_files(name, size, folder)
    fused = {v: fused_fraction(p, folder) for v, p in paths.items()}
    sizes = {v: os.path.getsize(p) / os.path.getsize(paths["float"]) for v, p in paths.items()}
    results = []
    for batch in batches:
        x = np.random.default_rng(3).standard_normal((batch, 3, size, size), dtype=np.float32)
        ms, ratio = latencies(paths, x, rounds=rounds, threads=threads)
        results.append(Result(name, batch, size, fused, ms, ratio, sizes))
    return results


# ------------------------------------------------------------------ reporting


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(results: list[Result]) -> str:
    head = ("| model | batch | fused fxquant | fused ORT default | fused ORT u8s8 | float ms | fxquant x float "
            "| ORT default x float | ORT u8s8 x float | fxquant size x float | ORT u8s8 size x float |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r.model} | {r.batch} | {_pct(r.fused['fxquant'])} | {_pct(r.fused['ort_default'])} | {_pct(r.fused['ort_u8s8'])} "
            f"| {r.latency_ms['float']:.1f} | {r.ratio['fxquant']:.2f} | {r.ratio['ort_default']:.2f} | {r.ratio['ort_u8s8']:.2f} "
            f"| {r.file_ratio['fxquant']:.3f} | {r.file_ratio['ort_u8s8']:.3f} |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> dict[str, bool | None]:
    """Each target: True met, False missed, None not measured in this run."""
    r18 = [r for r in results if r.model == "resnet18" and r.batch == 1]
    return {
        "100% of Conv/Gemm/MatMul fused (fxquant, every model)": all(r.fused["fxquant"] == 1.0 for r in results),
        "fxquant faster than ORT quantize_static defaults (every row)": all(r.ratio["fxquant"] < r.ratio["ort_default"] for r in results),
        "fxquant faster than ORT quantize_static U8S8 per-channel (every row)": all(r.ratio["fxquant"] < r.ratio["ort_u8s8"] for r in results),
        f"int8 <= {TARGET_SPEEDUP}x float latency (resnet18, batch 1)": r18[0].ratio["fxquant"] <= TARGET_SPEEDUP if r18 else None,
        f"file size <= {TARGET_SIZE}x float (every model)": all(r.file_ratio["fxquant"] <= TARGET_SIZE for r in results),
    }


def _report(results: list[Result]) -> str:
    marks = {True: "met", False: "NOT met", None: "not measured"}
    return markdown(results) + "\n\n" + "\n".join(f"- {k}: {marks[v]}" for k, v in targets(results).items())


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
    print(_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [asdict(r) for r in results], "targets": targets(results),
                       "settings": {"size": args.size, "iters": args.iters, "threads": args.threads}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
