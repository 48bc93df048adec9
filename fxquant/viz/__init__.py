"""fxquant.viz: every stage of a model's quantization on one self-contained HTML page.

    >>> fxquant.viz(model, torch.randn(1, 3, 224, 224), "model.html", sqnr=True)
    >>> fxquant.viz("model.onnx", output="model.html", overlay="steps.json", svg="model.svg")

The page (no network: elkjs, the data and the viewer are inlined) holds the traced, fused, decomposed,
annotated, fake-quant, reference int8, ONNX and ONNX Runtime-optimised graphs; a stage selector, a diff
view of any two stages matched by node name, quantization details per node, overlays as heat maps,
module groups that expand and collapse (laid out by elkjs), search, pan and zoom.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.viz.build import absorbed_by_fusion, assign_groups, lowered_layers, model_stages, onnx_file_stages
from fxquant.viz.outputs import ELK_VERSION, dot_source, render_dot, render_page, write_atomic
from fxquant.viz.overlay import (check_names, layer_sqnr, load_overlay, model_explorer_data, model_explorer_graph,
                                 model_explorer_graph_path, model_explorer_paths)

__all__ = ["viz", "VizResult", "load_model", "parse_input_shape"]

STAGE_IDS = ("traced", "fused", "decomposed", "annotated", "fake-quant", "int8", "onnx", "ort")


@dataclass
class VizResult:
    """What viz wrote: the page, the other files, the stages drawn and their node counts, the overlays, and
    the overlay names that match no node of any stage."""

    path: str
    files: list[str] = field(default_factory=list)
    graphs: dict = field(default_factory=dict, repr=False)  # stage id -> networkx.DiGraph (Stage.to_networkx)
    stages: dict[str, int] = field(default_factory=dict)  # stage id -> node count (-1: the stage failed)
    errors: dict[str, str] = field(default_factory=dict)
    overlays: list[str] = field(default_factory=list)
    unknown: dict[str, list[str]] = field(default_factory=dict)  # overlay name -> names no stage has


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or 1x3x224x224) -> (1, 3, 224, 224); FxQuantError on anything else."""
    parts = [p.strip() for p in str(text).replace("x", ",").replace("×", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise FxQuantError(f"--input-shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def load_model(spec: str) -> nn.Module:
    """'package.module:attr' or 'path/to/file.py:attr' -> the nn.Module. An attr that is a class or a function
    is called with no arguments (torchvision.models:resnet18 builds a random-init resnet18; no weights fetched)."""
    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where or not attr:
        raise FxQuantError(f"model {spec!r}: expected package.module:attr, path/to/file.py:attr or an .onnx file")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FxQuantError(f"model {spec!r}: no such file {where}")
        name = "_fxquant_viz_" + os.path.splitext(os.path.basename(where))[0]
        module_spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise FxQuantError(f"model {spec!r}: importing {where} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise FxQuantError(f"model {spec!r}: cannot import {where!r} ({exc}); is it installed, or did you mean a .py file?") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FxQuantError(f"model {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise FxQuantError(f"model {spec!r}: calling {attr}() to build the model failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise FxQuantError(f"model {spec!r}: {attr} is a {type(obj).__name__}, not an nn.Module (nor a class or function "
                           "that returns one)")
    return obj


def _is_onnx_path(model) -> bool:
    if not isinstance(model, (str, os.PathLike)):
        return False
    text = os.fspath(model)
    return text.lower().endswith(".onnx") or (os.path.isfile(text) and not text.endswith(".py"))


def _example_inputs(example_inputs, input_shape) -> tuple:
    """The given tensors, or seeded N(0, 1) tensors of `input_shape`: "1,3,224,224", (1, 3, 224, 224), or a list
    of such shapes for a model with several inputs."""
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise FxQuantError("example_inputs: expected a tensor or a tuple of tensors")
        return inputs
    if input_shape is None:
        raise FxQuantError("a model needs example inputs: pass example_inputs=, or input_shape=(1, 3, 224, 224) "
                           "(CLI: --input-shape 1,3,224,224)")
    one_shape = isinstance(input_shape, str) or all(isinstance(d, int) for d in input_shape)
    shapes = [input_shape] if one_shape else list(input_shape)
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(parse_input_shape(s if isinstance(s, str) else ",".join(map(str, s))), generator=g) for s in shapes)


def viz(model, example_inputs=None, output="fxquant_viz.html", *, input_shape=None, overlay=None, overlay_better=None,
        sqnr: bool = False, dot=None, svg=None, png=None, model_explorer=None, dot_stage: str | None = None,
        config=None, calib_data=None, stages=None, title: str | None = None, **options) -> VizResult:
    """Draw every stage of `model` on one HTML page at `output`; return what was written.

    model: an nn.Module, a 'package.module:attr' / 'file.py:attr' string, or the path of an .onnx file.
    example_inputs: tensor(s) the model runs on; or input_shape (e.g. (1, 3, 224, 224), or a list of shapes),
        filled with seeded N(0, 1). Not used for an ONNX file.
    overlay: per-node numbers: a {node_name: value} dict, a JSON file path, or a list of either;
        overlay_better: 'higher' (SQNR-like) or 'lower' (error-like, the default) for a plain dict.
    sqnr: also compute the per-layer SQNR (dB) of the fake-quant model against the float model, by node name.
    dot / svg / png: also write one stage (dot_stage, default the fake-quant stage, else the last one) as
        Graphviz DOT, or drawn by Graphviz's dot (needs the `dot` program: apt-get install graphviz).
    model_explorer: also write the overlays as Google Model Explorer node data (one file per overlay), and the
        graph they belong to (the ONNX stage, else the last stage) in its graph JSON, at `<stem>.graph.json`.
    config / **options: how to quantize, as for fxquant.quantize (an fxquant.QuantConfig, and/or its fields as
        keywords: backend="tensorrt", w_bits=4, target="vnni", exclude=[...]).
    calib_data: calibration batches (default: 4 seeded N(0, 1) batches of the inputs' shapes).
    stages: stage ids to keep (default all of STAGE_IDS that apply).
    """
    from fxquant.config import QuantConfig

    if config is not None and not isinstance(config, QuantConfig):
        raise FxQuantError(f"config: expected an fxquant.QuantConfig, got {type(config).__name__}")
    config = (config or QuantConfig()).replace(**options)
    overlays = _overlays(overlay, overlay_better)
    if stages is not None:
        unknown = [s for s in stages if s not in STAGE_IDS]
        if unknown:
            raise FxQuantError(f"stages={unknown}: expected some of {STAGE_IDS}")
    if isinstance(model, str) and not _is_onnx_path(model):
        source = model
        model = load_model(model)
    else:
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if _is_onnx_path(model):
        if sqnr:
            raise FxQuantError("sqnr=True needs the float model; an ONNX file alone has no float reference (give the model)")
        built = onnx_file_stages(model)
    elif isinstance(model, nn.Module):
        inputs = _example_inputs(example_inputs, input_shape)
        needed = None if stages is None else set(stages) | ({"traced", "fused", "fake-quant"} if sqnr else set())
        built = model_stages(model, inputs, config=config, calib_data=calib_data, stages=needed, keep_float=sqnr)
    else:
        raise FxQuantError(f"model: expected an nn.Module, 'package.module:attr', 'file.py:attr' or an .onnx path, "
                           f"got {type(model).__name__}")
    stage_list = built.stages
    absorbed_by_fusion(stage_list)
    lowered_layers(stage_list)
    assign_groups(stage_list)
    if sqnr:
        if built.traced is None or built.qmodel is None:
            raise FxQuantError("sqnr=True: the fake-quant stage could not be built, so there is nothing to compare")
        absorbed = {r["n"]: r["ab"] for s in stage_list if s.id == "fake-quant" for r in s.nodes if "ab" in r}
        overlays.insert(0, {"name": "SQNR (dB)", "better": "higher", "unknown": [],
                            "values": layer_sqnr(built.traced, built.qmodel, built.example_inputs, absorbed)})
    if stages is not None:  # the ones SQNR needed but the caller did not ask for go now
        stage_list = [s for s in stage_list if s.id in stages]
    names = {r["n"] for s in stage_list for r in s.nodes}
    for o in overlays:
        check_names(o, names)
    data = {
        "title": title or f"fxquant viz: {source}",
        "source": source,
        "stages": [s.as_json() for s in stage_list],
        "overlays": overlays,
        "notes": built.notes,
        "metadata": built.metadata,
        "elk": ELK_VERSION,
    }
    page = render_page(data)
    result = VizResult(path=write_atomic(output, page), overlays=[o["name"] for o in overlays],
                       unknown={o["name"]: o["unknown"] for o in overlays if o["unknown"]})
    result.files.append(result.path)
    for s in stage_list:
        result.stages[s.id] = -1 if s.error else len(s.nodes)
        if not s.error:
            result.graphs[s.id] = s.to_networkx()
        if s.error:
            result.errors[s.id] = s.error
    if dot or svg or png:
        stage = _pick_stage(data["stages"], dot_stage)
        source_dot = dot_source(stage, overlay=overlays[0] if overlays else None)
        if dot:
            result.files.append(write_atomic(dot, source_dot))
        for path, fmt in ((svg, "svg"), (png, "png")):
            if path:
                result.files.append(write_atomic(path, render_dot(source_dot, fmt)))
    if model_explorer:
        if not overlays:
            raise FxQuantError("model_explorer: there is no overlay to write; pass overlay= or sqnr=True")
        import json

        graph_id = _graph_id(stage_list)
        for path, o in zip(model_explorer_paths(model_explorer, overlays), overlays):
            result.files.append(write_atomic(path, json.dumps(model_explorer_data(o, graph_id), indent=1)))
        graph_stage = next((s for s in data["stages"] if s["id"] == "onnx" and not s["error"]), None) or \
            [s for s in data["stages"] if not s["error"]][-1]
        graph = model_explorer_graph(graph_stage, graph_id, f"{source}: {graph_stage['label']}")
        result.files.append(write_atomic(model_explorer_graph_path(model_explorer), json.dumps(graph, indent=1)))
    return result


def _graph_id(stages) -> str:
    """Model Explorer's graph id for the file: the ONNX graph's name (fxquant's exporter names it after the model)."""
    return next((s.graph_name for s in stages if s.id == "onnx" and s.graph_name), "main_graph")


def _pick_stage(stages: list[dict], wanted: str | None) -> dict:
    ok = [s for s in stages if not s["error"]]
    if not ok:
        raise FxQuantError("no stage could be built, so there is nothing to draw as DOT/SVG/PNG")
    if wanted is None:
        return next((s for s in ok if s["id"] == "fake-quant"), ok[-1])
    for s in ok:
        if s["id"] == wanted:
            return s
    raise FxQuantError(f"dot_stage={wanted!r}: expected one of {[s['id'] for s in ok]}")


def _overlays(overlay, better) -> list[dict]:
    if overlay is None:
        return []
    items = overlay if isinstance(overlay, (list, tuple)) else [overlay]
    return [load_overlay(o, better=better) for o in items]


class _CallableModule(type(sys)):
    """`fxquant.viz(...)` calls viz() while `fxquant.viz` stays this package (so `import fxquant.viz.outputs` works)."""

    def __call__(self, *args, **kwargs) -> VizResult:
        return viz(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
