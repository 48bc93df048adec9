"""fxquant's graph passes, one per file: each is `GraphModule -> GraphModule` (trace takes the nn.Module)."""

from fxquant.passes.annotate_quant import annotate_quant
from fxquant.passes.decompose_ops import decompose_ops
from fxquant.passes.fuse_modules import fuse_modules
from fxquant.passes.insert_fake_quant import insert_fake_quant
from fxquant.passes.lift_functional import lift_functional
from fxquant.passes.lower_to_int8 import lower_to_int8
from fxquant.passes.smooth_activations import smooth_activations
from fxquant.passes.trace_model import trace_model

__all__ = ["trace_model", "lift_functional", "fuse_modules", "decompose_ops", "annotate_quant", "insert_fake_quant", "lower_to_int8",
           "smooth_activations"]
