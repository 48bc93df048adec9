"""QuantSpec validation, with_bits narrowing and check_bits.

An invalid spec must fail at construction with an FxQuantError whose message names the field.
"""

from __future__ import annotations

import dataclasses

import pytest

from fxquant import FxQuantError, QuantSpec
from fxquant.specs import BIAS_SPEC, activation_spec, check_bits, weight_spec


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(dtype="int4"), "dtype"),
        (dict(dtype="float8"), "dtype"),
        (dict(dtype=["uint8"]), "dtype"),
        (dict(dtype="uint8", qmin=-1, qmax=255), "qmin"),
        (dict(dtype="uint8", qmin=0, qmax=256), "qmax"),
        (dict(dtype="int8", qmin=-129, qmax=127), "qmin"),
        (dict(dtype="int8", qmin=-128, qmax=128), "qmax"),
        (dict(dtype="uint8", qmin=10, qmax=10), "qmin"),  # an empty range
        (dict(dtype="uint8", qmin=200, qmax=100), "qmin"),
        (dict(dtype="uint8", qmin=0.5, qmax=255), "qmin"),  # not an integer
        (dict(dtype="uint8", qmin=0, qmax=254.5), "qmax"),
        (dict(dtype="uint8", symmetric=True), "symmetric"),  # zero point 0 needs a signed range
        (dict(dtype="int8", qmin=-127, qmax=127, axis=-1), "axis"),
        (dict(dtype="int8", qmin=-127, qmax=127, axis=1.0), "axis"),
        (dict(dtype="int8", qmin=-127, qmax=127, axis=True), "axis"),  # a bool is not a channel index
        (dict(observer="histogram"), "observer"),
        (dict(observer="MinMax"), "observer"),
        (dict(fake_quant="LSQ"), "fake_quant"),  # kinds are "ste", "lsq", "lsq+"
    ],
)
def test_invalid_spec_raises_naming_the_field(fields, named):
    with pytest.raises(FxQuantError, match=rf"QuantSpec\.[a-z_/]*{named}"):
        QuantSpec(**fields)


def test_valid_specs_construct_and_are_frozen():
    spec = QuantSpec("int8", -128, 127, symmetric=True, axis=1, observer="moving_average")
    assert (spec.dtype, spec.qmin, spec.qmax, spec.axis) == ("int8", -128, 127, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.qmax = 100
    # the library's own specs are valid
    assert activation_spec() == QuantSpec("uint8", 0, 255)
    assert weight_spec() == QuantSpec("int8", -127, 127, symmetric=True, axis=0, observer="current")
    assert (BIAS_SPEC.dtype, BIAS_SPEC.qmin, BIAS_SPEC.qmax) == ("int32", -(2**31) + 1, 2**31 - 1)


@pytest.mark.parametrize("bits", range(2, 9))
def test_with_bits_narrows_activation_from_zero(bits):
    spec = activation_spec().with_bits(bits)
    assert (spec.qmin, spec.qmax) == (0, 2**bits - 1)
    assert spec.bits == bits
    assert spec.dtype == "uint8" and not spec.symmetric


@pytest.mark.parametrize("bits", range(2, 9))
def test_with_bits_keeps_weights_symmetric(bits):
    spec = weight_spec().with_bits(bits)
    half = 2 ** (bits - 1) - 1
    assert (spec.qmin, spec.qmax) == (-half, half)
    assert spec.bits == bits
    assert spec.symmetric and spec.axis == 0 and spec.observer == "current"


def test_with_bits_of_the_same_width_is_the_same_spec():
    assert activation_spec().with_bits(8) == activation_spec()
    assert weight_spec().with_bits(8) == weight_spec()
    assert weight_spec(4) == weight_spec().with_bits(4)


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -8, True, False, 8.0, "8", None])
def test_check_bits_rejects_and_names_the_argument(bad):
    with pytest.raises(FxQuantError, match=r"^a_bits="):
        check_bits("a_bits", bad)


@pytest.mark.parametrize("bad", [1, 9, True])
def test_with_bits_rejects_bad_widths(bad):
    with pytest.raises(FxQuantError, match="bits"):
        activation_spec().with_bits(bad)


@pytest.mark.parametrize("bits", range(2, 9))
def test_check_bits_accepts_two_to_eight(bits):
    assert check_bits("w_bits", bits) == bits
