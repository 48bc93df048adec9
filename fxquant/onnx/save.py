"""Writing the file: atomically, and with the tensors in `<name>.data` (ONNX external data) past 2 GB.

On any failure nothing is left at `path` (with external data, nothing at `path` or `path.data`): the
file is written into a temporary folder beside `path` and moved into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx


PROTOBUF_LIMIT = 2**31 - 1  # bytes: one serialized ModelProto cannot pass this


def too_big(model: onnx.ModelProto) -> bool:
    tensors = sum(t.ByteSize() for t in model.graph.initializer)
    return tensors + 64 * 2**20 > PROTOBUF_LIMIT  # 64 MiB for the nodes and names


def save(model: onnx.ModelProto, path: str, *, external: bool, check: bool) -> None:
    """Write atomically: into a temporary folder beside `path` (checked there when `external`), then moved
    into place; with external data, `<name>.data` first, then the model that points to it."""
    folder, name = os.path.split(os.path.abspath(path))
    tmpdir = tempfile.mkdtemp(prefix=".fxquant-", dir=folder)
    try:
        tmp = os.path.join(tmpdir, name)
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.data",
                            size_threshold=0)
            if check:
                onnx.checker.check_model(tmp, full_check=True)
            if os.path.exists(os.path.join(tmpdir, f"{name}.data")):  # absent when the model has no tensors
                os.replace(os.path.join(tmpdir, f"{name}.data"), os.path.join(folder, f"{name}.data"))
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
