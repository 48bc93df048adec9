"""Pass speed at scale: fxquant.quantize() (trace and every prepare pass, no calibration) and export_onnx.

    python -m fxquant.tools.bench_passes [--repeats 5] [--blocks 1000,10000] [--json OUT]

1. resnet50 at 224x224: fxquant.quantize(qat=True) against torch.ao's prepare_qat_fx, the peer baseline,
   in one process, runs interleaved (fxquant, torch.ao, fxquant, ...); medians.  target: ratio <= 0.5
2. chains of N conv-bn-relu blocks (4 channels, 4x4): quantize() at each N.
   targets: time(10k) / time(1k) <= 12 (near-linear), time(1k) < 3 s
   The same for N dense blocks (conv, SiLU, cat onto a slice of the block input): SiLU decomposition
   and cat's shared qparams over one long chain of cats, reported beside it (no target in the issue).
3. export_onnx of resnet50's reference int8 graph (calibrated on one batch).  target: < 5 s

Each model is built (and, for torch.ao, copied) outside the timed region; fxquant.quantize copies the
model it is given, inside it. Times are wall-clock medians on this machine; the ratio of interleaved
runs is the number that travels between machines.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import fxquant

TARGETS = {"resnet50_ratio": 0.5, "chain_scaling": 12.0, "chain_1k_s": 3.0, "export_resnet50_s": 5.0}


def chain(blocks: int, channels: int = 4) -> nn.Module:
    """`blocks` x (Conv2d 1x1, BatchNorm2d, ReLU) in one nn.Sequential: a graph of 3 * blocks ops."""
    layers = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers).eval()


class _DenseBlock(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv, self.act = nn.Conv2d(channels, channels // 2, 1), nn.SiLU()

    def forward(self, x):
        return torch.cat([x[:, : x.shape[1] // 2], self.act(self.conv(x))], 1)


def dense_chain(blocks: int, channels: int = 4) -> nn.Module:
    """`blocks` x (Conv2d, SiLU, cat): every cat's first input comes through the previous cat."""
    return nn.Sequential(*[_DenseBlock(channels) for _ in range(blocks)]).eval()


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_resnet50(repeats: int, size: int = 224) -> dict:
    """fxquant.quantize(qat=True) vs torch.ao prepare_qat_fx on resnet50, interleaved; medians."""
    import torchvision
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().train()
    x = torch.randn(1, 3, size, size)
    mapping = get_default_qat_qconfig_mapping("x86")
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_seconds(lambda: fxquant.quantize(model, x, qat=True, progress=False)))
        fresh = copy.deepcopy(model)  # prepare_qat_fx swaps modules of the model it gets
        theirs.append(_seconds(lambda: prepare_qat_fx(fresh, mapping, (x,))))
    f, t = statistics.median(ours), statistics.median(theirs)
    return {"fxquant_s": f, "torch_ao_s": t, "ratio": f / t, "fxquant_runs": ours, "torch_ao_runs": theirs}


def bench_chains(blocks: list[int], repeats: int, make=chain) -> dict:
    x = torch.randn(1, 4, 4, 4)
    out = {}
    for n in blocks:
        model = make(n)
        out[n] = statistics.median(_seconds(lambda: fxquant.quantize(model, x, progress=False)) for _ in range(repeats))
    return out


def bench_export(repeats: int, size: int = 224) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, size, size)
    int8 = fxquant.convert(fxquant.quantize(model, x, calib_data=[x], progress=False))
    with tempfile.TemporaryDirectory() as folder:
        runs = [_seconds(lambda: fxquant.export_onnx(int8, f"{folder}/resnet50.onnx", x)) for _ in range(repeats)]
    return {"export_s": statistics.median(runs), "runs": runs}


def run(*, repeats: int, blocks: list[int], size: int = 224, export: bool = True) -> dict:
    """Every measurement and, per target, whether it is met."""
    result = {"resnet50": bench_resnet50(repeats, size), "chains": bench_chains(blocks, max(1, repeats // 2)),
              "dense_chains": bench_chains(blocks, 1, dense_chain)}
    if export:
        result["export"] = bench_export(max(1, repeats // 2), size)
    met = {"resnet50_ratio": result["resnet50"]["ratio"] <= TARGETS["resnet50_ratio"]}
    chains = result["chains"]
    if 1000 in chains and 10000 in chains:
        result["chain_scaling"] = chains[10000] / chains[1000]
        met["chain_scaling"] = result["chain_scaling"] <= TARGETS["chain_scaling"]
    if 1000 in chains:
        met["chain_1k_s"] = chains[1000] < TARGETS["chain_1k_s"]
    if export:
        met["export_resnet50_s"] = result["export"]["export_s"] < TARGETS["export_resnet50_s"]
    result["met"] = met
    return result


def table(result: dict) -> str:
    r = result["resnet50"]
    lines = ["| measurement | value | target | met |", "|---|---|---|---|",
             f"| resnet50 quantize(qat=True) / torch.ao prepare_qat_fx | {r['fxquant_s']:.2f} s / {r['torch_ao_s']:.2f} s "
             f"= {r['ratio']:.2f} | <= {TARGETS['resnet50_ratio']} | {result['met']['resnet50_ratio']} |"]
    for n, s in result["chains"].items():
        target = f"< {TARGETS['chain_1k_s']} s" if n == 1000 else ""
        lines.append(f"| quantize(), {n} conv-bn-relu blocks | {s:.2f} s | {target} | {result['met'].get('chain_1k_s', '') if n == 1000 else ''} |")
    if "chain_scaling" in result:
        lines.append(f"| time(10k) / time(1k) | {result['chain_scaling']:.1f} | <= {TARGETS['chain_scaling']} | {result['met']['chain_scaling']} |")
    dense = result.get("dense_chains", {})
    for n, s in dense.items():
        lines.append(f"| quantize(), {n} dense blocks (conv, SiLU, cat) | {s:.2f} s | | |")
    if 1000 in dense and 10000 in dense:
        lines.append(f"| dense time(10k) / time(1k) | {dense[10000] / dense[1000]:.1f} | | |")
    if "export" in result:
        lines.append(f"| export_onnx(resnet50 int8) | {result['export']['export_s']:.2f} s | < {TARGETS['export_resnet50_s']} s | "
                     f"{result['met']['export_resnet50_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxquant.tools.bench_passes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", default="1000,10000", help="chain lengths, comma-separated (default 1000,10000)")
    parser.add_argument("--json", help="write the measurements as JSON to this file")
    args = parser.parse_args(argv)
    result = run(repeats=args.repeats, blocks=[int(b) for b in args.blocks.split(",") if b])
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
