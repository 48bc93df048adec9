"""tools/bench_hf's paired verdict (the benchmark itself needs the trained wheel and stays out of `make test`)."""

import pytest

from fxquant.tools.bench_hf import paired_verdict


def test_paired_verdict_reads_the_rounds_not_the_medians():
    theirs = [1.0] * 30
    assert paired_verdict([0.99] * 25 + [1.5] * 5, theirs)["verdict"] == "faster"  # 25 of 30 won: p ~ 1.6e-4
    assert paired_verdict([1.01] * 25 + [0.5] * 5, theirs)["verdict"] == "slower"
    tie = paired_verdict([0.9, 1.1] * 15, theirs)
    assert tie["verdict"] == "no difference shown" and tie["wins"] == tie["losses"] == 15
    assert tie["p_faster"] == tie["p_slower"] > 0.5


def test_paired_verdict_with_too_few_rounds_decides_nothing():
    v = paired_verdict([0.5] * 4, [1.0] * 4)  # winning all 4 rounds: p = 1/16 > 0.05
    assert v["p_faster"] is None and v["verdict"] == "no difference shown"
    with pytest.raises(ValueError, match="same number"):
        paired_verdict([1.0], [1.0, 2.0])
