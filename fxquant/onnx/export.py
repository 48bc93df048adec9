"""export_onnx: write a fake-quant, reference int8 or float model as an ONNX QDQ file.

    export_onnx(model, path, example_inputs)
      -> the int8 graph (convert a fake-quant model, trace a float one)
      -> fxquant.onnx.walk.to_onnx (the converters, by op family)
      -> onnx.checker, optional onnxsim, the backend's metadata (fxquant.onnx.metadata)
      -> fxquant.onnx.check against the backend's rule table -> fxquant.onnx.save (atomic, external data past 2 GB)

The int8 graph maps one to one onto ONNX QDQ:
    get_attr w_i8 (int8)     -> an int8 initializer           (weights are never float in the file)
    dequantize(w_i8, s, zp)  -> DequantizeLinear(axis=0)
    quantize(x, s, zp)       -> QuantizeLinear
    F.conv2d / F.linear      -> Conv / Gemm (or MatMul), between DequantizeLinear and QuantizeLinear
"""

from __future__ import annotations

import os

import onnx
from torch import fx, nn

from fxquant.api import convert
from fxquant.backends import BACKEND_META, load_backend
from fxquant.config import CONFIG_META
from fxquant.errors import FxQuantError
from fxquant.inputs import EXAMPLE_META, NOT_GIVEN, as_inputs
from fxquant.meta import KEY
from fxquant.nn import fake_quants
from fxquant.numerics import dequantize, quantize
from fxquant.onnx.check import assert_valid
from fxquant.onnx.metadata import stamp
from fxquant.onnx.save import save, too_big
from fxquant.onnx.walk import to_onnx
from fxquant.passes import trace_model
from fxquant.pending import PendingQuantization, not_run_yet


MIN_OPSET, MAX_OPSET = 13, 21


def _as_graph(model, example_inputs) -> fx.GraphModule:
    """The int8 graph to export: convert a fake-quant model, trace a float one."""
    if isinstance(model, PendingQuantization):
        raise not_run_yet("export_onnx")
    if isinstance(model, fx.GraphModule) and fake_quants(model):
        return convert(model)
    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, nn.Module):
        return trace_model(model.eval(), example_inputs=example_inputs, auto_leaf=True)
    raise FxQuantError(f"model: expected an nn.Module or an fxquant GraphModule, got {type(model).__name__}")


def _recorded_inputs(model):
    """The inputs a quantized model recorded (fxquant.inputs.EXAMPLE_META) for an export given none."""
    if isinstance(model, PendingQuantization):
        raise not_run_yet("export_onnx")
    recorded = model.meta.get(EXAMPLE_META) if isinstance(model, fx.GraphModule) else None
    if recorded is None:
        raise FxQuantError("export_onnx: example_inputs: this model records none (only fxquant.quantize's models do); "
                           "pass them: export_onnx(model, path, example_inputs)")
    return recorded


def weight_dequantize_count(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes that read an initializer directly (the int8 weights and int32 biases)."""
    inits = {i.name for i in model.graph.initializer}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in model.graph.node)


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim, keeping every weight DequantizeLinear (its constant folding would turn them back to float)."""
    import onnxsim

    before = weight_dequantize_count(model)
    simplified, ok = onnxsim.simplify(model, skip_constant_folding=True)
    if not ok or weight_dequantize_count(simplified) != before:
        raise FxQuantError(f"export_onnx: onnxsim changed the weight DequantizeLinear nodes ({before} before); not simplified")
    return simplified


def _float_nodes(gm: fx.GraphModule) -> list[str]:
    """The traced ops no backend row claimed (the user's exclude=, or ops the table keeps float), and weight-only
    rows (an int8 embedding table: its lookup reads no quantized activation and gives a float one)."""
    def weight_only(meta) -> bool:
        return meta.kind == "quantize" and meta.weight is not None and not meta.inputs and meta.output is None

    return [n.name for n in gm.graph.nodes if n.op.startswith("call_") and n.target not in (quantize, dequantize)
            and KEY in n.meta and (n.meta[KEY].rule is None or n.meta[KEY].kind == "float" or weight_only(n.meta[KEY]))]


def export_onnx(model, path, example_inputs=NOT_GIVEN, *, opset: int = 17, dynamic_batch: bool = True, simplify: bool = False,
                check: bool = True, backend=None, external_data: bool | None = None) -> onnx.ModelProto:
    """Write `model` (fake-quant, reference int8, or float) to `path` as ONNX QDQ; returns the ModelProto.

    `example_inputs` give the shapes (the batch dimension stays dynamic); left out, a model from
    fxquant.quantize uses the ones it recorded (its example inputs, or one row of its first batch).

    A quantized model's file records its backend and its QuantConfig (metadata_props, fxquant.onnx.metadata)
    and, with `check=True`, is checked by onnx.checker and by fxquant.onnx.check against that backend's rule
    table: any violation raises and no file is written. `backend` (a name or Backend) overrides the one recorded at quantize time.
    `external_data`: keep the tensors in `<path>.data` beside the file (ONNX external data); None
    decides by size, on when the file would pass protobuf's 2 GB (a float vit_h_14 or regnet_y_128gf).
    The returned ModelProto then refers to that file instead of holding the tensors.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise FxQuantError(f"opset={opset!r}: expected an integer from {MIN_OPSET} (per-channel DequantizeLinear) to {MAX_OPSET}")
    if not isinstance(path, (str, os.PathLike)):
        raise FxQuantError(f"path={path!r}: expected the file to write, a str or os.PathLike (e.g. 'model.onnx')")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FxQuantError(f"path={path!r}: folder {folder!r} does not exist")
    inputs = as_inputs(example_inputs if example_inputs is not NOT_GIVEN else _recorded_inputs(model))
    graph = _as_graph(model, inputs)
    table = backend if backend is not None else graph.meta.get(BACKEND_META)
    table = load_backend(table) if table is not None else None
    onnx_model = to_onnx(graph, inputs, opset=opset, dynamic_batch=dynamic_batch)
    external = too_big(onnx_model) if external_data is None else bool(external_data)
    if check and not external:  # a model past 2 GB is checked from its files (below)
        onnx.checker.check_model(onnx_model, full_check=True)
    if simplify and external:
        raise FxQuantError("simplify=True: onnxsim takes models under 2 GB; export with simplify=False (or external_data=False)")
    if simplify:
        onnx_model = _simplify(onnx_model)
    if table is not None:
        stamp(onnx_model, table, _float_nodes(graph), graph.meta.get(CONFIG_META))
        if check:
            assert_valid(onnx_model, quantized_for=getattr(graph.meta.get(BACKEND_META), "name", None))
    save(onnx_model, path, external=external, check=check)
    return onnx_model
