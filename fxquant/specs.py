"""`QuantSpec`: how one tensor is quantized. Frozen and validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fxquant.errors import FxQuantError

# storage dtype -> (lowest, highest) integer it can hold
DTYPE_RANGES = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "int32": (-(2**31), 2**31 - 1),
}
# current: the range of the latest tensor only (weights); percentile / mse: a range chosen on a histogram of
# everything seen (per tensor) or on the latest tensor (per channel), see fxquant.nn
OBSERVERS = ("minmax", "moving_average", "current", "percentile", "mse")
# ste: fixed qparams from the observer, straight-through gradient; lsq: learned scale (Esser et al. 2020);
# lsq+: learned scale and zero point (Bhalgat et al. 2020), for asymmetric specs
FAKE_QUANTS = ("ste", "lsq", "lsq+")


@dataclass(frozen=True)
class QuantSpec:
    """One quantized tensor: q = clamp(round(x / scale) + zero_point, qmin, qmax), stored as `dtype`.

    symmetric: zero_point is 0 and the range is centred (weights).
    axis: None for one scale per tensor, else the per-channel axis.
    """

    dtype: str = "uint8"
    qmin: int = 0
    qmax: int = 255
    symmetric: bool = False
    axis: int | None = None
    observer: str = "minmax"
    fake_quant: str = "ste"

    def __post_init__(self):
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_RANGES:
            raise FxQuantError(f"QuantSpec.dtype={self.dtype!r}: expected one of {sorted(DTYPE_RANGES)}")
        lo, hi = DTYPE_RANGES[self.dtype]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.qmin, self.qmax)) or not (
            lo <= self.qmin < self.qmax <= hi
        ):
            raise FxQuantError(
                f"QuantSpec.qmin/qmax=({self.qmin!r}, {self.qmax!r}): expected integers {lo} <= qmin < qmax <= {hi} for dtype {self.dtype}"
            )
        if self.symmetric and self.qmin >= 0:
            raise FxQuantError(f"QuantSpec.symmetric=True needs a signed range; got qmin={self.qmin} (use dtype 'int8')")
        if self.axis is not None and (not isinstance(self.axis, int) or isinstance(self.axis, bool) or self.axis < 0):
            raise FxQuantError(f"QuantSpec.axis={self.axis!r}: expected None (per-tensor) or a channel index >= 0")
        if self.observer not in OBSERVERS:
            raise FxQuantError(f"QuantSpec.observer={self.observer!r}: expected one of {OBSERVERS}")
        if self.fake_quant not in FAKE_QUANTS:
            raise FxQuantError(f"QuantSpec.fake_quant={self.fake_quant!r}: expected one of {FAKE_QUANTS}")
        if self.fake_quant == "lsq+" and self.symmetric:
            raise FxQuantError("QuantSpec.fake_quant='lsq+' learns a zero point, which a symmetric spec fixes at 0: use 'lsq'")

    @property
    def bits(self) -> int:
        return (self.qmax - self.qmin).bit_length()

    def with_bits(self, bits: int) -> QuantSpec:
        """The same spec narrowed to `bits` (weights keep a symmetric range, activations start at 0)."""
        check_bits("bits", bits)
        if self.symmetric:
            half = 2 ** (bits - 1) - 1
            return replace(self, qmin=-half, qmax=half)
        lo = DTYPE_RANGES[self.dtype][0]
        return replace(self, qmin=lo, qmax=lo + 2**bits - 1)


def check_bits(name: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise FxQuantError(f"{name}={bits!r}: expected an integer bit width from 2 to 8")
    return bits


def check_layer_bits(layer_bits) -> tuple:
    """layer_bits ({module name: (w_bits, a_bits)}, or its items) as a tuple of (name, (w_bits, a_bits)), each width checked."""
    if not isinstance(layer_bits, (dict, tuple)):
        raise FxQuantError(f"layer_bits={layer_bits!r}: expected a dict {{module name: (w_bits, a_bits)}}")
    items = tuple(layer_bits.items()) if isinstance(layer_bits, dict) else layer_bits
    for name, bits in items:
        if not (isinstance(bits, tuple) and len(bits) == 2):
            raise FxQuantError(f"layer_bits[{name!r}]={bits!r}: expected a pair (w_bits, a_bits)")
        check_bits(f"layer_bits[{name!r}] w_bits", bits[0])
        check_bits(f"layer_bits[{name!r}] a_bits", bits[1])
    return items


def activation_spec(bits: int = 8, observer: str = "minmax") -> QuantSpec:
    """Per-tensor affine uint8 (narrowed to `bits`)."""
    return QuantSpec("uint8", 0, 255, observer=observer).with_bits(bits)


def weight_spec(bits: int = 8, axis: int = 0) -> QuantSpec:
    """Per-channel symmetric int8 on the output-channel axis, restricted range [-127, 127]."""
    return QuantSpec("int8", -127, 127, symmetric=True, axis=axis, observer="current").with_bits(bits)


BIAS_SPEC = QuantSpec("int32", -(2**31) + 1, 2**31 - 1, symmetric=True, axis=0)
