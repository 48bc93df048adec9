"""The sha256 of the ONNX bytes fxquant writes for a fixed set of models: a refactor's behaviour check.

    python -m fxquant.tools.export_fingerprint            # one line per model: sha256  name
    python -m fxquant.tools.export_fingerprint --strip-key fxquant.config   # the digest without that metadata entry

Run it before and after a change that must not change what is exported: equal lines, equal files. The
models: the demo's DigitNet (seeded, untrained) quantized several ways (PTQ, QAT, 4-bit weights at opset 21,
per-layer bits, an excluded layer, the tensorrt backend, reduced range, the vnni target, the float model), and one small model per
torchvision family (fxquant.tools.zoo.FAMILIES), PTQ-calibrated on two seeded batches. Nothing is
downloaded. `--strip-key K` drops metadata entry K from each file before hashing, to compare a file that
gained an entry with one written before it existed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile

import onnx
import torch

import fxquant
from fxquant.tools.zoo import FAMILIES, small_family_model

DEMO_VARIANTS = {  # name: (quantize keywords, export keywords); None: export the float model
    "demo_ptq": (dict(), dict()),
    "demo_qat": (dict(qat=True), dict()),
    "demo_w4": (dict(w_bits=4), dict(opset=21)),
    "demo_layer_bits": (dict(layer_bits={"fc": (8, 8)}, w_bits=6), dict()),
    "demo_exclude": (dict(exclude=["stem"]), dict()),
    "demo_tensorrt": (dict(backend="tensorrt"), dict()),
    "demo_reduce_range": (dict(reduce_range=True), dict()),
    "demo_vnni": (dict(target="vnni"), dict()),
    "demo_float": (None, dict()),
}


def digest(path: str, strip_keys=()) -> str:
    data = open(path, "rb").read()
    if strip_keys:
        model = onnx.load_from_string(data)
        kept = [(p.key, p.value) for p in model.metadata_props if p.key not in strip_keys]
        del model.metadata_props[:]
        for key, value in kept:
            model.metadata_props.add(key=key, value=value)
        data = model.SerializeToString()
    return hashlib.sha256(data).hexdigest()


def _export(model, example, calib, quantize_kw, export_kw, path: str) -> None:
    if quantize_kw is None:
        fxquant.export_onnx(model, path, example, **export_kw)
        return
    qmodel = fxquant.quantize(model, example, calib_data=calib, progress=False, **quantize_kw)
    if quantize_kw.get("qat"):
        qmodel.eval()
    fxquant.export_onnx(fxquant.convert(qmodel), path, example, **export_kw)


def cases():
    """(name, model, example input, calibration batches, quantize keywords, export keywords), seeded."""
    from fxquant.demo import DigitNet

    torch.manual_seed(0)
    demo = DigitNet().eval()
    g = torch.Generator().manual_seed(1)
    example = torch.randn(1, 1, 28, 28, generator=g)
    calib = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]
    for name, (quantize_kw, export_kw) in DEMO_VARIANTS.items():
        yield name, demo, example, calib, quantize_kw, export_kw
    for family in sorted(FAMILIES):
        model, size = small_family_model(family)
        g = torch.Generator().manual_seed(2)
        example = torch.randn(1, 3, size, size, generator=g)
        yield family, model, example, [torch.randn(4, 3, size, size, generator=g) for _ in range(2)], {}, {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strip-key", action="append", default=[], help="leave this metadata_props entry out of the digest")
    parser.add_argument("--only", nargs="*", help="these model names only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        for name, model, example, calib, quantize_kw, export_kw in cases():
            if args.only and name not in args.only:
                continue
            path = os.path.join(folder, f"{name}.onnx")
            _export(model, example, calib, quantize_kw, export_kw, path)
            print(f"{digest(path, args.strip_key)}  {name}", flush=True)


if __name__ == "__main__":
    main()
