"""Every stage of one model, built with fxquant's public API and kept as plain data (graph.Stage).

    model ─trace_model─► traced ─fuse_modules─► fused ─decompose_ops─► decomposed ─annotate_quant─► annotated
          ─insert_fake_quant + calibrate─► fake-quant ─convert─► int8 ─export_onnx─► onnx ─ONNX Runtime─► ort

Each prepare pass runs on its own (`fxquant.prepare_passes` + `pipeline.run_passes`), so the graph after
every pass is seen. A stage that fails (an op the exporter lacks, say) is kept with its error and the
later stages are not built: the page shows what was reached and why it stopped.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.viz.graph import Stage, fx_stage, onnx_outputs, onnx_stage

CALIB_BATCHES = 4  # random calibration batches when none are given (scales are then for N(0, 1) inputs)
LARGEST_ONNX_BYTES = 2 * 1024**3  # protobuf's limit: a bigger file uses external data


@dataclass
class Built:
    """The stages, plus what the overlays need: the traced float graph and the fake-quant model."""

    stages: list[Stage]
    traced: fx.GraphModule | None = None  # a float copy, made only when `keep_float` (the SQNR overlay needs it)
    qmodel: fx.GraphModule | None = None
    example_inputs: tuple = ()
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _stage_label(pass_name: str) -> tuple[str, str]:
    return {
        "trace_model": ("traced", "traced"),
        "fuse_modules": ("fused", "fused"),
        "decompose_ops": ("decomposed", "decomposed"),
        "annotate_quant": ("annotated", "annotated"),
        "insert_fake_quant": ("fake-quant", "fake-quant"),
    }.get(pass_name, (pass_name, pass_name))


def _report_reasons(gm: fx.GraphModule) -> dict[str, str]:
    """node name -> why it runs float, from fxquant.report (the row, the trace failure, or no row)."""
    from fxquant.report import report

    try:
        rep = report(gm)
    except FxQuantError:
        return {}
    reasons = {op.name: f"kept whole by trace, runs float: {op.leaf}" for op in rep.leaves}
    reasons.update({op.name: f"float by rule: backend row '{op.rule}'" for op in rep.float_by_rule})
    reasons.update({op.name: "no backend rule claims this op: it runs float between a dequantize and the next quantize"
                    for op in rep.no_rule})
    return reasons


def _random_batches(inputs: tuple, n: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    return [tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t for t in inputs)
            for _ in range(n)]


def _stage_error(stage_id: str, exc: BaseException) -> str:
    return f"{stage_id} could not be built: {type(exc).__name__}: {exc}"


def model_stages(model: nn.Module, example_inputs: tuple, *, config=None, calib_data=None, stages=None,
                 keep_float: bool = False) -> Built:
    """Run the pipeline on a copy of `model` and snapshot every stage (see the module docstring).

    `example_inputs`: a tuple of tensors the model runs on (their shapes fix the traced shapes).
    `config`: the fxquant.QuantConfig (None: the defaults).
    `calib_data`: batches for calibration (default: CALIB_BATCHES seeded N(0, 1) batches of the inputs' shapes).
    `stages`: the stage ids to keep (all by default); the pipeline still runs up to the last one asked for.

    The passes before insert_fake_quant run one by one (fxquant.prepare_passes + pipeline.run_passes) for their
    snapshots; the fake-quant model itself is fxquant.quantize's, so it is exactly what a user gets.
    """
    from fxquant.api import convert, prepare_passes, quantize
    from fxquant.config import QuantConfig
    from fxquant.onnx import export_onnx
    from fxquant.pipeline import pass_name, run_passes

    wanted = set(stages) if stages else None
    config = config or QuantConfig()
    built = Built(stages=[], example_inputs=example_inputs)
    keep = (lambda sid: wanted is None or sid in wanted)
    passes = prepare_passes(config, example_inputs=example_inputs)
    gm = _copy(model).eval()
    for i, p in enumerate(passes):
        sid, label = _stage_label(pass_name(p))
        try:
            if sid == "fake-quant":  # quantize() = these passes + the model's meta (backend, config) + calibration
                batches = calib_data if calib_data is not None else _random_batches(example_inputs, CALIB_BATCHES)
                gm = quantize(_copy(model).eval(), example_inputs, config, calib_data=batches, progress=False)
            else:
                gm = run_passes(gm, [p])
        except FxQuantError as exc:
            if i == 0:
                raise _trace_error(exc, example_inputs) from exc
            built.stages.append(Stage(sid, label, pass_name(p), error=_stage_error(sid, exc)))
            return built
        if i == 0 and keep_float:
            built.traced = _copy(gm)
        if sid == "fake-quant":
            if calib_data is None:
                built.notes.append(f"calibrated on {CALIB_BATCHES} seeded N(0, 1) batches of the input shape: pass "
                                   "calib_data for the ranges of real data")
        if keep(sid):
            reasons = _report_reasons(gm) if sid in ("annotated", "fake-quant") else {}
            built.stages.append(fx_stage(gm, Stage(sid, label, pass_name(p)), why=reasons))
    built.qmodel = gm
    reasons = _report_reasons(gm)
    if wanted is not None and not wanted & {"int8", "onnx", "ort"}:
        return built
    try:
        int8 = convert(gm)
    except Exception as exc:  # noqa: BLE001 - shown on the page, the earlier stages are still worth seeing
        built.stages.append(Stage("int8", "reference int8", "convert", error=_stage_error("int8", exc)))
        return built
    if keep("int8"):
        built.stages.append(fx_stage(int8, Stage("int8", "reference int8", "convert"), why=_report_reasons(int8)))
    if wanted is not None and not wanted & {"onnx", "ort"}:
        return built
    with tempfile.TemporaryDirectory(prefix="fxquant-viz-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(int8, path, example_inputs)
        except Exception as exc:  # noqa: BLE001
            built.stages.append(Stage("onnx", "ONNX (QDQ)", "export_onnx", error=_stage_error("onnx", exc)))
            return built
        built.stages.extend(_onnx_file_stages(path, float_names=reasons, keep=keep, scopes=False, check=False))
    return built


def _copy(model: nn.Module) -> nn.Module:
    """quantize()'s own model copy (about 10x faster than copy.deepcopy on thousands of modules), when there."""
    try:
        from fxquant.api import copy_model
    except ImportError:  # moved by a refactor: the slow, sure way
        return copy.deepcopy(model)
    return copy_model(model)


def _trace_error(exc: FxQuantError, example_inputs: tuple) -> FxQuantError:
    shapes = ", ".join("×".join(map(str, t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
    return FxQuantError(f"the model could not be traced and run on inputs of shape {shapes} (input_shape / "
                        f"--input-shape): {str(exc).splitlines()[0]}. Give the shape the model's forward expects, e.g. --input-shape 1,3,224,224")


def load_onnx(path, *, check: bool = True) -> "object":
    """The ModelProto at `path`, checked (`check`: onnx.checker; a file export_onnx just wrote needs none); a
    corrupt or truncated file raises FxQuantError naming it."""
    import onnx

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FxQuantError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise FxQuantError(f"{path}: not a readable ONNX file (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    if not model.graph.node:
        raise FxQuantError(f"{path}: the ONNX file holds no graph nodes (corrupt, truncated, or not an ONNX model)")
    if not check:
        return model
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise FxQuantError(f"{path}: the ONNX model is invalid ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                           "re-export it, or check it with onnx.checker") from exc
    return model


def _onnx_file_stages(path: str, *, float_names: dict[str, str], keep, scopes: bool, check: bool = True) -> list[Stage]:
    """The file's own graph, then ONNX Runtime's optimised one (what it runs: QLinearConv, QGemm, ...)."""
    from fxquant.check import ort_session

    model = load_onnx(path, check=check)
    out = []
    onnx_s = onnx_stage(model, Stage("onnx", "ONNX (QDQ)", "export_onnx"), float_names=float_names, scopes=scopes)
    if keep("onnx"):
        out.append(onnx_s)
    if not keep("ort"):
        return out
    optimized = path + ".ort.onnx"
    try:
        ort_session(path, optimized_path=optimized)
        import onnx

        opt = onnx.load(optimized)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors, shown on the page
        out.append(Stage("ort", "ONNX Runtime optimised", "onnxruntime (extended)", error=_stage_error("ort", exc)))
        return out
    finally:
        if os.path.exists(optimized):
            os.remove(optimized)
    ort_s = onnx_stage(opt, Stage("ort", "ONNX Runtime optimised", "onnxruntime (extended)"), float_names=float_names,
                       islands=True, scopes=scopes)
    absorbed_by_kernels(model, opt, ort_s)
    out.append(ort_s)
    return out


def onnx_file_stages(path) -> Built:
    """Stages of an ONNX file given on its own: the file, and ONNX Runtime's optimised graph."""
    import onnx

    model = load_onnx(path)
    meta = {p.key: p.value for p in model.metadata_props}
    float_names = {name: "kept float (recorded in the file's fxquant.float_nodes)"
                   for name in meta.get("fxquant.float_nodes", "").split(",") if name}
    scopes = "fxquant.backend" not in meta
    with tempfile.TemporaryDirectory(prefix="fxquant-viz-") as tmp:
        copy_path = os.path.join(tmp, "model.onnx")
        onnx.save(model, copy_path)  # ONNX Runtime writes its optimised graph next to the file it reads
        stages = _onnx_file_stages(copy_path, float_names=float_names, keep=lambda sid: True, scopes=scopes, check=False)
    return Built(stages=stages, metadata=meta)


# ------------------------------------------------------------------ correspondence across stages


def absorbed_by_kernels(model, optimized, stage: Stage, limit: int = 64) -> None:
    """Each node of ONNX Runtime's graph lists the nodes of the file it replaced (`ab`): those on the paths
    from its inputs back from its outputs, in the file's graph (a QLinearConv: DQ, DQ, Conv, Relu, Q)."""
    producer = {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
    inits = {t.name for t in model.graph.initializer}
    outputs = onnx_outputs(optimized)
    by_name = {n.name or (n.output[0] if n.output else ""): n for n in optimized.graph.node}
    for rec in stage.nodes:
        node = by_name.get(rec["n"])
        if node is None:
            continue
        stop = set(node.input)  # the kernel's inputs, and the file's constants: where a path back ends
        seen, todo = [], [producer[o] for o in outputs.get(rec["n"], []) if o in producer]
        names = set()
        while todo and len(seen) < limit:
            n = todo.pop()
            name = n.name or n.output[0]
            if name in names:
                continue
            names.add(name)
            seen.append(name)
            todo.extend(producer[x] for x in n.input if x and x not in stop and x not in inits and x in producer)
        covered = [s for s in seen if s != rec["n"]]
        if covered and len(seen) < limit:
            rec["ab"] = covered


def absorbed_by_fusion(stages: list[Stage]) -> None:
    """A node that a pass removed is absorbed into the producer that took its users (a BatchNorm and a ReLU
    into their conv): the host lists it in `ab` in every later stage where the host is."""
    by_id = {s.id: s for s in stages if not s.error}
    traced, fused = by_id.get("traced"), by_id.get("fused")
    if traced is None or fused is None:
        return
    kept = fused.names()
    absorbed: dict[str, list[str]] = {}
    for rec in traced.nodes:
        if rec["n"] in kept:
            continue
        host = rec
        for _ in range(len(traced.nodes)):
            if host["n"] in kept or not host["i"]:
                break
            host = traced.nodes[host["i"][0]]
        if host["n"] in kept:
            absorbed.setdefault(host["n"], []).append(rec["n"])
    member_of = {m: host for host, members in absorbed.items() for m in members}
    for rec in traced.nodes:  # the traced stage marks the group's members too, for the box around them
        if rec["n"] in absorbed:
            rec["fg"] = rec["n"]
        elif rec["n"] in member_of:
            rec["fg"] = member_of[rec["n"]]
    started = False
    for stage in stages:
        started = started or stage is fused
        if not started or stage.error or stage.id in ("onnx", "ort"):
            continue
        for rec in stage.nodes:
            if rec["n"] in absorbed:
                rec["ab"] = absorbed[rec["n"]] + rec.get("ab", [])


LOWERED_PARTS = ("", "_conv2d", "_linear", "_w_dq", "_b_dq", "_b_dq/scale")  # lower_to_int8's names for one layer


def lowered_layers(stages: list[Stage]) -> None:
    """In the int8 and ONNX stages, the nodes one weighted layer was lowered to (its weight and bias DQ, the
    conv/linear, the activation that kept the layer's name) share `fg`: the page boxes them as one layer."""
    weighted = {r["n"] for s in stages if s.id == "fake-quant" and not s.error for r in s.nodes if "w" in r}
    for stage in stages:
        if stage.id not in ("int8", "onnx") or stage.error:
            continue
        names = stage.names()
        for host in weighted:
            parts = [names[host + p] for p in LOWERED_PARTS if host + p in names]
            if len(parts) > 1:
                for i in parts:
                    stage.nodes[i]["fg"] = host


def assign_groups(stages: list[Stage]) -> None:
    """Give every node a module path `g`: its own (traced nodes: nn_module_stack), or the one its name had in an
    earlier stage, or that of the longest known name it extends (layer1_0_conv1_fq -> layer1_0_conv1's), or its
    first input's, or its first user's, or the root."""
    known: dict[str, str] = {}
    for stage in stages:
        if stage.error:
            continue
        for rec in stage.nodes:
            if rec["n"] in known:
                rec["g"] = known[rec["n"]]
            elif "g" not in rec:
                prefix = _known_prefix(rec["n"], known)
                if prefix is not None:
                    rec["g"] = known[prefix]
                elif rec["i"] and "g" in stage.nodes[rec["i"][0]] and rec["k"] != "output":
                    rec["g"] = stage.nodes[rec["i"][0]]["g"]
        users: dict[int, int] = {}
        for j, rec in enumerate(stage.nodes):
            for i in rec["i"]:
                users.setdefault(i, j)
        for j in range(len(stage.nodes) - 1, -1, -1):  # constants' DQ and the like: their consumer's group
            rec = stage.nodes[j]
            if "g" not in rec:
                user = users.get(j)
                rec["g"] = stage.nodes[user].get("g", "") if user is not None and rec["k"] not in ("input", "output") else ""
            known.setdefault(rec["n"], rec["g"])


def _known_prefix(name: str, known: dict[str, str]) -> str | None:
    head = name.split("/")[0]
    if head != name and head in known:
        return head
    while "_" in head:
        head = head.rpartition("_")[0]
        if head in known:
            return head
    return None
