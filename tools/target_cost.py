"""What the portable target costs in accuracy: the reference int8 model against float, per model, at each target.

    python -m fxquant.tools.target_cost [--models a,b,...] [--sqnr-only] [--a7] [--gptq] [--json OUT]
                                        [--from-json PORTABLE.json VNNI.json] [--update OLD.json] [--join A.json B.json ...]

Runs tools/coverage's row (random-init torchvision model, BatchNorms randomized, PTQ on random batches,
each model in its own process) once with target="portable" (the default: 7-bit weights on the convs and
linears that reach a pair-summing integer GEMM) and once with target="vnni" (8-bit weights everywhere),
and prints the "SQNR int8 vs float" column of both (the reference int8 graph against the float model,
in dB; it does not depend on the CPU) and their difference. The ONNX Runtime columns are left out:
they depend on the CPU, and the vnni file is not meant for a CPU without VNNI. `--from-json` formats
two `coverage --json` files (portable first) instead of running the models. `--sqnr-only` stops each row
after that column (no export, no ONNX Runtime): the same figures, in a fraction of the time. `--a7` adds
portable at a_bits=7: 7-bit activations leave room for 8-bit weights on every GEMM (2 * 127 * 127 <= 32767),
the other way to pay for a pair-sum-safe layout; it measures the reference int8 model only (export_onnx refuses
7-bit activations: ONNX's QuantizeLinear saturates to 8 or 4 bits). `--gptq` adds portable with GPTQ
rounding (QuantConfig.gptq: each layer's weights rounded for its output error on the same calibration
batches; the 7-bit grid and scales unchanged, so the file stays pair-sum safe): the way to win the bit back
that keeps the portable file.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

from fxquant.tools import coverage

MODELS = ("resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,regnet_y_400mf,shufflenet_v2_x1_0,"
          "squeezenet1_1,densenet121,googlenet,mnasnet1_0,vgg11_bn,alexnet,convnext_tiny,vit_b_16,swin_t,inception_v3,"
          "resnext50_32x4d,wide_resnet50_2,efficientnet_v2_s")
TARGETS = ("portable", "vnni")
A7 = "portable a7"  # --a7: portable at 7-bit activations, where 2 * 127 * 127 fits: every weight stays 8-bit
GPTQ = "portable gptq"  # --gptq: portable with GPTQ rounding (fxquant.gptq)
# variant: (target, a_bits, gptq, column title, name in its median line)
VARIANTS = {"portable": ("portable", 8, False, "portable", ""), "vnni": ("vnni", 8, False, "8-bit vnni", ""),
            GPTQ: ("portable", 8, True, "portable + GPTQ", " (portable + GPTQ)"),
            A7: ("portable", 7, False, "portable at 7-bit activations, 8-bit weights", " (portable, 7-bit activations)")}


def run(models: list[str], *, timeout: float = 1800, threads: int = 1, sqnr_only: bool = False,
        a7: bool = False, gptq: bool = False) -> dict[str, list[dict]]:
    """{variant: [coverage row as a dict, ...]}: each target at 8-bit activations, and A7 / GPTQ when asked."""
    out = {}
    for key in [*TARGETS, *([GPTQ] if gptq else []), *([A7] if a7 else [])]:
        target, a_bits, with_gptq = VARIANTS[key][:3]
        args = types.SimpleNamespace(threads=threads, torch_ao=False, target=target, timeout=timeout, sqnr_only=sqnr_only,
                                     a_bits=a_bits, gptq=with_gptq)
        out[key] = []
        for name in models:
            row = coverage._in_subprocess(name, coverage.input_size(name), args)
            print(f"{key:12s} {name:24s} {coverage._fmt(row.sqnr_int8_db, ' dB'):>9s} {row.error}", file=sys.stderr, flush=True)
            out[key].append(vars(row))
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    half = len(values) // 2
    return values[half] if len(values) % 2 else (values[half - 1] + values[half]) / 2


def table(rows: dict[str, list[dict]]) -> str:
    """Markdown: model, SQNR int8 vs float per variant, each one's difference to vnni, and their medians."""
    keys = [k for k in VARIANTS if k in rows]
    by_key = {k: {r["model"]: r.get("sqnr_int8_db") for r in rows[k]} for k in keys}
    others = [k for k in keys if k != "vnni"]
    head = ["model", "SQNR int8 vs float, portable (dB)", "8-bit vnni (dB)", "portable - vnni (dB)"]
    for k in others[1:]:
        head += [f"{VARIANTS[k][3]} (dB)", "that - vnni (dB)"]
    timed = GPTQ in keys  # GPTQ's cost: the calibration time of both portable rows (this machine, as it ran)
    by_time = {k: {r["model"]: r.get("calibrate_s") for r in rows[k]} for k in ("portable", GPTQ)} if timed else {}
    head += ["calibration, portable (s)", "with GPTQ (s)"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    deltas: dict[str, list[float]] = {k: [] for k in others}
    for name, portable in by_key["portable"].items():
        vnni = by_key["vnni"].get(name)
        db = lambda v, sign="": "failed" if v is None else f"{v:{sign}.1f}"  # noqa: E731 (differences signed)
        cells = [db(portable), db(vnni)]
        for k in others:
            mine = by_key[k].get(name)
            delta = None if mine is None or vnni is None else mine - vnni
            deltas[k] += [delta] if delta is not None else []
            cells += [db(delta, "+")] if k == "portable" else [db(mine), db(delta, "+")]
        seconds = [by_time[k].get(name) for k in by_time]
        cells += ["-" if t is None else f"{t:.1f}" for t in seconds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for k in others:
        d = deltas[k]
        if d:
            lines.append(f"\nmedian difference{VARIANTS[k][4]} {_median(d):+.1f} dB "
                         f"over {len(d)} models (min {min(d):+.1f}, max {max(d):+.1f})")
    return "\n".join(lines)


def _merged(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` rows with each model `new` has replaced by its new row, then the new models."""
    by_model = {r["model"]: r for r in new}
    return [by_model.pop(r["model"], r) for r in old] + list(by_model.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxquant.tools.target_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated torchvision classification models")
    parser.add_argument("--json", help="write both targets' rows here")
    parser.add_argument("--from-json", nargs=2, metavar=("PORTABLE", "VNNI"), help="format two coverage --json files")
    parser.add_argument("--a7", action="store_true", help="also portable at 7-bit activations (8-bit weights everywhere)")
    parser.add_argument("--gptq", action="store_true", help="also portable with GPTQ rounding (QuantConfig.gptq)")
    parser.add_argument("--sqnr-only", action="store_true", help="stop each row after SQNR int8 vs float (no export, no ORT)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model and target")
    parser.add_argument("--join", nargs="+", metavar="JSON", help="format the rows of several --json runs as one table")
    parser.add_argument("--update", metavar="JSON", help="start from the rows of an earlier --json run and rerun only "
                        "--models in every variant, replacing their rows")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = {t: json.load(open(path))["rows"] for t, path in zip(TARGETS, args.from_json)}
    elif args.join:
        rows = {}
        for path in args.join:
            with open(path) as f:
                for key, part in json.load(f).items():
                    rows[key] = _merged(rows.get(key, []), part)
    else:
        names = [m for m in args.models.split(",") if m]
        unknown = sorted(set(names) - set(coverage.all_models()))
        if unknown:
            parser.error(f"--models: not torchvision classification models: {unknown}")
        rows = run(names, timeout=args.timeout, sqnr_only=args.sqnr_only, a7=args.a7, gptq=args.gptq)
        if args.update:
            with open(args.update) as f:
                old = json.load(f)
            rows = {key: _merged(old.get(key, []), rows.get(key, [])) for key in VARIANTS if key in old or key in rows}
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
