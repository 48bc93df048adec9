"""Issue 14, item 10: the same model, data and seed give byte-identical scales, state_dict and ONNX bytes,
in two separate processes; a checkpoint loads with torch.load(weights_only=True)."""

import subprocess
import sys

import torch

SCRIPT = r"""
import sys, torch
import fxquant
from fxquant.tools.fuzz import Spec, build, inputs_of
torch.manual_seed(0)
spec = Spec(dims=2, inputs=1, steps=(("conv", 6, 3, False, False), ("bn", "dead"), ("act", "relu"),
                                     ("conv", 6, 3, True, True), ("add", 2), ("float", "erf")), output="dict")
model = build(spec).eval()
qmodel = fxquant.quantize(model, calib_data=[inputs_of(spec, 4, 1), inputs_of(spec, 4, 2)], progress=False)
fxquant.export_onnx(qmodel, sys.argv[1] + ".onnx")
torch.save(qmodel.state_dict(), sys.argv[1] + ".pt")
"""


def _run(prefix) -> None:
    subprocess.run([sys.executable, "-c", SCRIPT, str(prefix)], check=True, timeout=300)


def test_two_processes_write_the_same_bytes_and_the_checkpoint_loads_weights_only(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and any(k.endswith("scale") for k in a)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
