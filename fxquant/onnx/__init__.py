"""fxquant.onnx: the exporter, by op family, and the checker of the files it writes.

    export.py       export_onnx: the public entry (convert / trace, to_onnx, check, metadata, save)
    walk.py         to_onnx: record values, walk the FX graph in order, one converter per node
    emitter.py      Emitter and Value: ONNX nodes and initializers as the walk emits them
    converters.py   the one table joining the families' tables: op key -> converter
      qdq.py          QuantizeLinear / DequantizeLinear (integer types, zero points, bias scales)
      conv_linear.py  Conv, Gemm / MatMul, BatchNormalization, LayerNormalization
      elementwise.py  activations and arithmetic
      pooling.py      pooling, reductions, Resize
      shape.py        reshapes, transposes, concat / split, pad, indexing, sizes that follow the batch
      attention.py    MatMul, Softmax, Einsum, scaled_dot_product_attention
    leaf.py         a call fx kept whole: exported by torch.onnx and inlined under its node's name
    metadata.py     what the file records (backend, reduce_range, float nodes)
    save.py         the atomic write, external data past 2 GB
    check.py        check_onnx: the file against its backend's rule table, by node name
"""

from fxquant.onnx.check import check_onnx
from fxquant.onnx.export import export_onnx

__all__ = ["export_onnx", "check_onnx"]
