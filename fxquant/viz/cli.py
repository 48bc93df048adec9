"""`fxquant viz`: the command-line face of fxquant.viz (registered by fxquant.cli)."""

from __future__ import annotations

import argparse
import sys

from fxquant.viz import STAGE_IDS, viz


def _run(args: argparse.Namespace) -> int:
    result = viz(args.model, output=args.output, input_shape=args.input_shape, overlay=args.overlay or None,
                 overlay_better=args.overlay_better, sqnr=args.sqnr, dot=args.dot, svg=args.svg, png=args.png,
                 model_explorer=args.model_explorer, dot_stage=args.stage, stages=args.stages.split(",") if args.stages else None,
                 **{k: v for k, v in (("backend", args.backend), ("w_bits", args.w_bits), ("a_bits", args.a_bits),
                                      ("target", args.target)) if v is not None})
    counts = ", ".join(f"{sid} {'failed' if n < 0 else n}" for sid, n in result.stages.items())
    print(f"wrote {result.path} (stages: {counts})")
    for path in result.files[1:]:
        print(f"wrote {path}")
    for sid, error in result.errors.items():
        print(f"fxquant viz: warning: {error}", file=sys.stderr)
    for name, unknown in result.unknown.items():
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        print(f"fxquant viz: warning: overlay {name!r}: {len(unknown)} name(s) match no node: {shown}", file=sys.stderr)
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser(
        "viz", help="draw every stage of a model's quantization (or an ONNX file) on one self-contained HTML page",
        description="Write one HTML file (no network needed) showing the traced, fused, annotated, fake-quant, reference "
                    "int8, ONNX and ONNX Runtime-optimised graphs, with a diff view, quantization details, overlays, "
                    "search and collapsible module groups. MODEL is package.module:attr or file.py:attr (an nn.Module, "
                    "or a class/function returning one, called with no arguments), or an .onnx file.",
    )
    p.add_argument("model", metavar="MODEL_OR_ONNX")
    p.add_argument("-o", "--output", default="fxquant_viz.html", help="the HTML page to write (default: fxquant_viz.html)")
    p.add_argument("--input-shape", action="append", metavar="N,C,H,W",
                   help="shape of the model's input (repeat for several inputs), e.g. 1,3,224,224; filled with seeded N(0, 1)")
    p.add_argument("--overlay", action="append", metavar="JSON",
                   help='per-node numbers {"node_name": value} (or {"name", "better", "values"}) drawn as a heat map; repeatable')
    p.add_argument("--overlay-better", choices=("higher", "lower"), help="which end of a plain overlay is good (default: lower)")
    p.add_argument("--sqnr", action="store_true", help="add the per-layer SQNR (dB) of fake-quant vs float as an overlay")
    p.add_argument("--dot", metavar="PATH", help="also write one stage as Graphviz DOT")
    p.add_argument("--svg", metavar="PATH", help="also draw that stage as SVG (needs Graphviz's dot program)")
    p.add_argument("--png", metavar="PATH", help="also draw that stage as PNG (needs Graphviz's dot program)")
    p.add_argument("--stage", choices=STAGE_IDS, help="the stage --dot/--svg/--png draw (default: fake-quant, else the last)")
    p.add_argument("--model-explorer", metavar="PATH", help="also write the overlays as Google Model Explorer node data JSON, and the graph "
                   "they apply to as its graph JSON at STEM.graph.json")
    p.add_argument("--stages", metavar="A,B", help=f"only these stages (some of {','.join(STAGE_IDS)}); the pipeline stops "
                   "after the last one asked for")
    p.add_argument("--backend", help="fxquant backend: onnxruntime (the default) or tensorrt")
    p.add_argument("--target", help="where the file runs, one of the backend's targets (onnxruntime: portable, vnni)")
    p.add_argument("--w-bits", type=int, help="weight bits, 2..8 (default 8)")
    p.add_argument("--a-bits", type=int, help="activation bits, 2..8 (default 8)")
    p.set_defaults(run=_run)
