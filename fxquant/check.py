"""Compare the deployed ONNX file with the reference int8 graph, in quantization steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from fxquant.numerics import dequantize


def ort_session(path, *, threads: int | None = None, optimized_path: str | None = None, level: str = "extended"):
    """An ONNX Runtime CPU session (quiet), optionally saving the optimised graph to `optimized_path`."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = levels[level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs: torch.Tensor) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})[0]


def output_scale(int8: fx.GraphModule) -> float | None:
    """The quantization step of the int8 graph's (first) output, when it ends in a dequantize."""
    out = next(n for n in int8.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not (isinstance(out, fx.Node) and out.target is dequantize):
        return None
    scale = getattr(int8, out.args[1].target)
    return float(scale) if scale.numel() == 1 else None


@dataclass(frozen=True)
class Agreement:
    max_steps: float  # largest |a - b| in output quantization steps
    within_one_step: float  # fraction of elements with |a - b| <= 1 step
    top1: float  # fraction of rows with the same argmax

    def __str__(self):
        return f"max {self.max_steps:.2f} steps, {100 * self.within_one_step:.3f}% within 1 step, top-1 agreement {100 * self.top1:.2f}%"


def agreement(reference, other, step: float) -> Agreement:
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    steps = np.abs(a - b) / step
    tol = 1 + 1e-4  # the float rounding of (q - zp) * scale itself
    top1 = float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean())
    return Agreement(float(steps.max()), float((steps <= tol).mean()), top1)
