"""Cost of one QAT training step against the float step, fxquant next to torch.ao, measured side by side.

    python -m fxquant.tools.bench_qat                 # resnet18, batch 16, 3x64x64, CPU, 2 threads
    python -m fxquant.tools.bench_qat --quick         # a smoke run (few rounds)

A step is forward + cross-entropy + backward + SGD step, in train mode. Each contestant has its own
copy of one randomly initialised torchvision model and its own optimizer. Every round times one step
of each contestant, in an order that rotates from round to round, so machine noise falls on all of
them alike; the figures are medians over rounds, and "x float" is the median of the per-round ratios
contestant / float. Contestants:

    float         the model itself
    fxquant ste   fxquant.quantize(qat=True): conv-bn kept training (ConvBnAct2d), observers on,
                  per-channel weight / per-tensor activation fake-quant with the STE
    fxquant lsq   the same with fake_quant="lsq" (learned scales)
    torch.ao      torch.ao.quantization.quantize_fx.prepare_qat_fx with the default x86 QAT qconfig
                  mapping: the peer baseline (fxquant itself never imports torch.ao)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

import fxquant


def _torch_ao_qat(model, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def contestants(model, example) -> dict:
    calib = [example]
    return {
        "float": copy.deepcopy(model).train(),
        "fxquant ste": fxquant.quantize(model, example, qat=True, calib_data=calib, progress=False),
        "fxquant lsq": fxquant.quantize(model, example, qat=True, calib_data=calib, progress=False, fake_quant="lsq"),
        "torch.ao": _torch_ao_qat(model, example),
    }


def _step(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure(models: dict, x, y, *, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each model, one step of each per round, the order rotating each round."""
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t = _step(models[k], optimizers[k], x, y)
            if r >= warmup:
                times[k].append(t)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    base = times["float"]
    return {k: {"median_ms": 1e3 * statistics.median(t),
                "x_float": statistics.median(a / b for a, b in zip(t, base))} for k, t in times.items()}


def table(summary: dict, args) -> str:
    lines = [f"resnet18, batch {args.batch}, 3x{args.size}x{args.size}, CPU, {args.threads} threads, "
             f"median of {args.rounds} interleaved rounds (torch {torch.__version__})",
             f"{'step':<14}{'ms / step':>11}{'x float':>10}"]
    lines += [f"{k:<14}{v['median_ms']:>11.1f}{v['x_float']:>10.2f}" for k, v in summary.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3 rounds after 1 warm-up round, batch 4")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.batch = 3, 1, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    summary = summarise(measure(contestants(model, x), x, y, rounds=args.rounds, warmup=args.warmup))
    print(table(summary, args))
    ste, ao = summary["fxquant ste"]["x_float"], summary["torch.ao"]["x_float"]
    print(f"target fxquant ste <= 1.3x float: {'met' if ste <= 1.3 else 'NOT met'} ({ste:.2f}x); "
          f"cheaper than torch.ao: {'met' if ste < ao else 'NOT met'} ({ste:.2f}x vs {ao:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
