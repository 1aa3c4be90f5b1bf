"""The verdict lines of benchmarks/breaching_compare.py, on made-up figures (breaching itself is not needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def compare_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import breaching_compare

        yield breaching_compare
    finally:
        sys.path.remove(str(BENCHMARKS))


def _result(module, name: str, privfl: list[list[float]], breaching: list[list[float]]):
    case = module.PhotoCase(name, 1, None, 1)
    result = module.CaseResult(case)
    for p, b in zip(privfl, breaching, strict=True):
        result.add("privfl", p)
        result.add("breaching", b)
        result.time("privfl", 1.0)
        result.time("breaching", 1.0)
    return result


def test_a_crop_set_is_the_mean_of_its_seeds_and_the_spread_is_reported(compare_module, capsys):
    # Case "a": crop set 1 is 2 dB behind on seed 0 and 2 dB ahead on seed 1: level on the mean.
    a = _result(compare_module, "a", [[30.0, 30.0], [20.0, 24.0]], [[25.0, 25.0], [22.0, 22.0]])
    assert a.privfl == [30.0, 22.0]
    assert a.seed_spread("privfl") == [0.0, 4.0]
    compare_module.print_tables([a])
    out = capsys.readouterr().out
    assert "privfl: spread over the seeds on one crop set (max - min), median 2.0 dB, largest 4.0 dB" in out
    assert "compared crop sets (each the mean of 2 seeds): 2; privfl within 1 dB of breaching or better on every one: yes" in out
    assert "on every case (median over its crop sets): yes" in out


def test_a_case_behind_in_its_median_fails_the_case_verdict(compare_module, capsys):
    ahead = _result(compare_module, "ahead", [[40.0], [40.0], [40.0]], [[20.0], [20.0], [20.0]])
    # One crop set far ahead does not save a case whose median crop set is 2 dB behind.
    behind = _result(compare_module, "behind", [[18.0], [18.0], [40.0]], [[20.0], [20.0], [20.0]])
    compare_module.print_tables([ahead, behind])
    out = capsys.readouterr().out
    assert "every case (median over its crop sets): no (worst: -2.0 dB, relu, behind)" in out
    assert "compared runs: 6; privfl within 1 dB of breaching or better on every one: no (worst: -2.0 dB" in out
    assert "spread over the seeds" not in out  # one seed: nothing to spread
