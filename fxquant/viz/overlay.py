"""Per-node numbers drawn as a heat map: the user's {node_name: value} JSON, or the per-layer SQNR computed here.

An overlay is {"name": str, "better": "higher" | "lower", "values": {node name: float}, "unknown": [names]}.
`better` says which end is good: SQNR is better higher, an error or a step count lower. A collapsed group
shows its worst child. The same numbers can be written in Google Model Explorer's node-data format.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import torch
from torch import fx

from fxquant.errors import FxQuantError

BETTER = ("higher", "lower")
SQNR_CAP_DB = 200.0  # an exact layer (no quantization error) is drawn at this many dB


def load_overlay(source, *, name: str | None = None, better: str | None = None) -> dict:
    """An overlay from a path to a JSON file or a mapping: either {node: value} or
    {"name": ..., "better": "higher"|"lower", "values": {node: value}}. Values must be finite numbers."""
    label = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FxQuantError(f"overlay {path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FxQuantError(f"overlay {path}: not JSON ({exc}); expected {{\"node_name\": value, ...}}") from exc
        label = os.path.splitext(os.path.basename(path))[0]
    else:
        data, label = source, "overlay"
    if not isinstance(data, Mapping):
        raise FxQuantError(f"overlay {label}: expected a JSON object {{\"node_name\": value}}, got {type(data).__name__}")
    if "values" in data and isinstance(data["values"], Mapping):
        name = name or data.get("name")
        better = better or data.get("better")
        data = data["values"]
    better = better or "lower"
    if better not in BETTER:
        raise FxQuantError(f"overlay {label}: better={better!r}; expected 'higher' (SQNR) or 'lower' (an error)")
    values = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FxQuantError(f"overlay {label}: node {key!r} has value {value!r}; expected a finite number")
        values[str(key)] = float(value)
    if not values:
        raise FxQuantError(f"overlay {label}: no values; expected {{\"node_name\": value, ...}}")
    return {"name": str(name or label), "better": better, "values": values, "unknown": []}


def check_names(overlay: dict, names: set[str]) -> None:
    """Record (sorted) the overlay's names that no stage has, so the page lists them."""
    overlay["unknown"] = sorted(k for k in overlay["values"] if k not in names)


def sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10·log10(Σ ref² / Σ (ref − other)²) in dB; SQNR_CAP_DB when they are equal."""
    ref, diff = reference.double(), reference.double() - other.double()
    noise, power = float((diff * diff).sum()), float((ref * ref).sum())
    if noise == 0:
        return SQNR_CAP_DB
    if power == 0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10 * math.log10(power / noise)))


def _record(gm: fx.GraphModule, inputs: tuple) -> dict[str, torch.Tensor]:
    """Every node's output tensor (by node name) when `gm` runs `inputs`."""
    seen: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                seen[n.name] = out.detach()
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def layer_sqnr(traced: fx.GraphModule, qmodel: fx.GraphModule, inputs: tuple, absorbed: dict[str, list[str]]) -> dict[str, float]:
    """Per-layer SQNR (dB) of the fake-quant model against the float one, matched by node name.

    A layer's float value is the traced graph's output of the same name, or of the last node it absorbed
    (conv1 with BatchNorm and ReLU fused in: the traced ReLU's output). Its quantized value is what its
    readers see: the output of its fake-quant when it has one. Both run the same `inputs`; the error
    measured is accumulated (every earlier layer's rounding included), the quantity a deployed model has.
    """
    float_values = _record(traced, inputs)
    was_training = qmodel.training
    qmodel.eval()
    try:
        quant_values = _record(qmodel, inputs)
    finally:
        qmodel.train(was_training)
    users = {n.name: [u.name for u in n.users] for n in qmodel.graph.nodes}
    out = {}
    for node in qmodel.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node.name not in quant_values:
            continue
        ref_name = (absorbed.get(node.name) or [node.name])[-1]
        if ref_name not in float_values or node.name.endswith("_fq"):
            continue
        fq_users = [u for u in users[node.name] if u == f"{node.name}_fq" and u in quant_values]
        q = quant_values[fq_users[0]] if fq_users else quant_values[node.name]
        ref = float_values[ref_name]
        if q.shape == ref.shape:
            out[node.name] = round(sqnr(ref, q), 3)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "overlay"


def model_explorer_paths(path, overlays: list[dict]) -> list[str]:
    """One file per overlay: `path` itself for one, `<stem>_<overlay>.json` for several."""
    path = os.fspath(path)
    if len(overlays) == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{_slug(o['name'])}{ext or '.json'}" for o in overlays]


def model_explorer_graph_path(path) -> str:
    """Where the graph goes next to the node data at `path`: `<stem>.graph.json`."""
    return os.path.splitext(os.fspath(path))[0] + ".graph.json"


def model_explorer_data(overlay: dict, graph_id: str) -> dict:
    """Google Model Explorer's node data (ModelNodeData): {graph id: {"results": {node: {"value": v}},
    "gradient": [{"stop": 0..1, "bgColor": ...}]}}; the gradient runs from good to bad by `better`."""
    good, bad = "#1a9850", "#d73027"
    lo, hi = (bad, good) if overlay["better"] == "higher" else (good, bad)
    results = {name: {"value": value} for name, value in overlay["values"].items()}
    return {graph_id: {"results": results, "gradient": [{"stop": 0, "bgColor": lo}, {"stop": 0.5, "bgColor": "#fee08b"},
                                                        {"stop": 1, "bgColor": hi}]}}


def model_explorer_graph(stage: dict, graph_id: str, label: str) -> dict:
    """One stage as Google Model Explorer's graph JSON (a GraphCollection: {"label", "graphs": [{"id", "nodes"}]}),
    which its built-in JSON adapter opens: node id = fxquant's node name (so the node data's keys are node ids by
    construction), label = the op, namespace = the module path with "/" (Model Explorer's collapsible layers),
    attrs = kind and shape, incomingEdges = the inputs. `stage`: a page stage (graph.Stage.as_json())."""
    nodes = stage["nodes"]
    out = []
    for rec in nodes:
        attrs = [{"key": "kind", "value": rec["k"]}] + ([{"key": "shape", "value": rec["sh"]}] if rec.get("sh") else [])
        out.append({"id": rec["n"], "label": rec["o"], "namespace": (rec.get("g") or "").replace(".", "/"), "attrs": attrs,
                    "incomingEdges": [{"sourceNodeId": nodes[i]["n"], "sourceNodeOutputId": "0", "targetNodeInputId": str(k)}
                                      for k, i in enumerate(rec["i"])]})
    return {"label": label, "graphs": [{"id": graph_id, "nodes": out}]}
