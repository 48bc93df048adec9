"""QuantConfig: one frozen, validated value for every quantize() option; the keywords still work, the
config is recorded in the model and the ONNX file, and it prints as the call that makes it again."""

from __future__ import annotations

import dataclasses
import operator
import pickle

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.pipeline import pass_name
from fxquant import FxQuantError, QuantConfig
from fxquant.config import CONFIG_META
from fxquant.onnx.metadata import CONFIG_KEY

NAMESPACE = {"fxquant": fxquant, "torch": torch, "operator": operator}


def _same_model(a, b) -> None:
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k


def test_defaults_print_as_the_bare_call():
    assert repr(QuantConfig()) == "fxquant.QuantConfig()"
    assert str(QuantConfig()) == "fxquant.quantize(model, example_inputs)"


def test_repr_is_the_call_that_makes_it_again():
    config = QuantConfig(backend="tensorrt", qat=True, w_bits=4, a_bits=6, fake_quant="lsq", observer="mse",
                         layer_bits={"fc": (8, 8)}, exclude=["layer4", nn.LayerNorm, F.relu, operator.add],
                         leaf_modules=(nn.MultiheadAttention,), concrete_args={"flag": True})
    text = repr(config)
    assert text.startswith("fxquant.QuantConfig(backend='tensorrt', qat=True, w_bits=4, a_bits=6, ")
    assert "torch.nn.LayerNorm" in text and "torch.nn.functional.relu" in text and "operator.add" in text
    assert eval(text, NAMESPACE) == config
    assert str(config) == "fxquant.quantize(model, example_inputs, " + text[len("fxquant.QuantConfig("):]


def test_the_target_is_a_field_and_reaches_the_backend_table():
    config = QuantConfig(target="vnni")
    assert repr(config) == "fxquant.QuantConfig(target='vnni')" and eval(repr(config), NAMESPACE) == config
    assert config.backend_table().target.name == "vnni"
    assert QuantConfig().backend_table().target.name == "portable"


def test_it_is_frozen_and_owns_its_containers():
    bits = {"fc": (8, 8)}
    config = QuantConfig(layer_bits=bits, exclude=["stem"])
    bits["stem"] = (4, 4)  # the caller's dict changes; the config does not
    assert config.layer_bits == (("fc", (8, 8)),) and config.as_kwargs()["layer_bits"] == {"fc": (8, 8)}
    assert config.exclude == ("stem",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.w_bits = 4


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(w_bits=9), r"^w_bits=9: expected an integer bit width from 2 to 8"),
        (dict(a_bits=1.5), r"^a_bits=1.5: "),
        (dict(backend="tflite"), r"^backend='tflite': expected one of"),
        (dict(qat="yes"), r"^qat='yes': expected True or False"),
        (dict(reduce_range=1), r"^reduce_range=1: expected True or False"),
        (dict(fake_quant="pact"), r"^fake_quant='pact': expected None \(the backend's\) or one of"),
        (dict(observer="max"), r"^observer='max': "),
        (dict(exclude="layer4"), r"^exclude='layer4': expected a list of .* e.g. exclude=\['layer4'\]"),
        (dict(leaf_modules=nn.LayerNorm), r"^leaf_modules=<class .*>: expected a list of module names or module types"),
        (dict(layer_bits=[("fc", 8)]), r"^layer_bits=\[\('fc', 8\)\]: expected a dict"),
        (dict(layer_bits={"fc": 8}), r"^layer_bits\['fc'\]=8: expected a pair \(w_bits, a_bits\)"),
        (dict(layer_bits={"fc": (8, 1)}), r"^layer_bits\['fc'\] a_bits=1: "),
        (dict(concrete_args=["x"]), r"^concrete_args=\['x'\]: expected a dict"),
        (dict(backend="tensorrt", reduce_range=True), r"^reduce_range=True: backend 'tensorrt' has no reduced-range"),
        (dict(target="avx"), r"^target='avx': backend 'onnxruntime' deploys to one of \('portable', 'vnni'\)"),
    ],
)
def test_a_bad_field_is_named_when_the_config_is_made(kwargs, named):
    with pytest.raises(FxQuantError, match=named):
        QuantConfig(**kwargs)


def test_an_unknown_option_is_named_with_the_list(residual_cnn, image):
    with pytest.raises(FxQuantError, match=r"^wbits: not an option of fxquant.quantize\(\); options: backend, qat, w_bits"):
        fxquant.quantize(residual_cnn, image, wbits=4, progress=False)
    with pytest.raises(FxQuantError, match=r"^config: expected an fxquant.QuantConfig, got dict"):
        fxquant.quantize(residual_cnn, image, {"w_bits": 4}, progress=False)


def test_config_and_keywords_give_the_same_model(residual_cnn, image, calib_batches):
    keywords = dict(w_bits=6, exclude=["fc"], observer="moving_average", layer_bits={"stem": (8, 8)})
    by_keywords = fxquant.quantize(residual_cnn, image, calib_data=calib_batches, progress=False, **keywords)
    config = QuantConfig(**keywords)
    by_config = fxquant.quantize(residual_cnn, image, config, calib_data=calib_batches, progress=False)
    _same_model(by_keywords, by_config)
    assert by_keywords.meta[CONFIG_META] == by_config.meta[CONFIG_META] == config


def test_a_keyword_overrides_one_field_of_the_config(residual_cnn, image, calib_batches):
    config = QuantConfig(w_bits=6, exclude=["fc"])
    qmodel = fxquant.quantize(residual_cnn, image, config, w_bits=4, calib_data=calib_batches, progress=False)
    assert qmodel.meta[CONFIG_META] == QuantConfig(w_bits=4, exclude=["fc"])
    assert config.w_bits == 6  # the caller's config is unchanged
    weights = [m for m in fxquant.nn.fake_quants(qmodel) if m.spec.symmetric and m.spec.axis == 0]
    assert weights and all(m.spec.qmax == 7 for m in weights)  # 4-bit weights: [-7, 7]


def test_prepare_passes_takes_the_config(residual_cnn, image):
    config = QuantConfig(backend="tensorrt", w_bits=6)
    def annotate(passes):
        return next(p for p in passes if pass_name(p) == "annotate_quant")

    passes = fxquant.prepare_passes(config, example_inputs=(image,))
    assert annotate(passes).keywords["backend"].name == "tensorrt" and annotate(passes).keywords["w_bits"] == 6
    assert annotate(fxquant.prepare_passes(example_inputs=(image,), backend="tensorrt", w_bits=6)).keywords["w_bits"] == 6


def test_the_config_travels_with_the_model_and_into_the_file(residual_cnn, image, calib_batches, tmp_path):
    config = QuantConfig(w_bits=6, exclude=[nn.AdaptiveAvgPool2d])
    qmodel = fxquant.quantize(residual_cnn, image, config, calib_data=calib_batches, progress=False)
    int8 = fxquant.convert(qmodel)
    assert int8.meta[CONFIG_META] == config
    assert pickle.loads(pickle.dumps(config)) == config
    fxquant.export_onnx(int8, tmp_path / "m.onnx", image)
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert meta[CONFIG_KEY] == repr(config)
    assert eval(meta[CONFIG_KEY], NAMESPACE) == config


def test_a_float_export_records_no_config(residual_cnn, image, tmp_path):
    fxquant.export_onnx(residual_cnn.eval(), tmp_path / "f.onnx", image)
    assert CONFIG_KEY not in {p.key for p in onnx.load(tmp_path / "f.onnx").metadata_props}
