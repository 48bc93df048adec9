"""What an exported file records about itself, in the ONNX model's metadata_props.

    fxquant.backend       the backend whose rule table placed the Q/DQ ("onnxruntime", "tensorrt")
    fxquant.reduce_range  "1" when the weights were narrowed to the backend's reduced range, else "0"
    fxquant.target        the deployment target the weights were fitted to ("portable", "vnni": fxquant.backends)
    fxquant.float_nodes   the ops the user kept float (exclude=), comma-separated: fxquant.onnx.check skips them
    fxquant.config        the QuantConfig the model was quantized with, as the call that makes it again
                          (repr: fxquant.QuantConfig(w_bits=4, ...)); absent for a model quantize() did not make

fxquant.onnx.check reads them back to check a file against the rules it was written for.
"""

from __future__ import annotations

import onnx
from onnx import helper

from fxquant.backends import Backend
from fxquant.config import QuantConfig

BACKEND_KEY, REDUCE_RANGE_KEY, FLOAT_NODES_KEY = "fxquant.backend", "fxquant.reduce_range", "fxquant.float_nodes"
TARGET_KEY = "fxquant.target"
CONFIG_KEY = "fxquant.config"


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The file's metadata_props as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def stamp(model: onnx.ModelProto, backend: Backend, float_nodes, config: QuantConfig | None = None) -> None:
    """Record in the file which backend's rules it follows, which ops the user kept float and the config."""
    meta = {BACKEND_KEY: backend.name, REDUCE_RANGE_KEY: str(int(backend.reduce_range)), TARGET_KEY: backend.target.name,
            FLOAT_NODES_KEY: ",".join(float_nodes)}
    if config is not None:
        meta[CONFIG_KEY] = repr(config)
    helper.set_model_props(model, {**read_metadata(model), **meta})
