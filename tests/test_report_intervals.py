"""Report intervals whose unit is the problem, and comparisons paired by seed (hand-computed cases)."""

import math

import pytest

from attnlab.report_intervals import _fmt_change, acc_change, accuracy_interval, ppl_change
from attnlab.stats import bootstrap_mean_seeds, wilson_interval


def test_seeds_that_agree_do_not_narrow_the_accuracy_interval():
    one = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    single = bootstrap_mean_seeds([one], n_boot=4000)
    triple = bootstrap_mean_seeds([one, one, one], n_boot=4000)
    assert triple["value"] == single["value"] == 0.6
    assert (triple["lo"], triple["hi"]) == (single["lo"], single["hi"])  # 3 copies are still 10 problems
    pooled = wilson_interval(18, 30)  # what pooling 3 seeds x 10 problems would claim
    assert pooled[1] - pooled[0] < triple["hi"] - triple["lo"]


def test_a_problem_every_seed_gets_right_has_no_spread():
    r = bootstrap_mean_seeds([[1, 1, 1], [1, 1, 1]], n_boot=200)
    assert (r["value"], r["lo"], r["hi"], r["n_examples"], r["n_seeds"]) == (1.0, 1.0, 1.0, 3, 2)


def test_one_seed_gets_wilson_and_several_get_the_problem_bootstrap():
    lo, hi, how = accuracy_interval([[1, 0, 0, 0]])
    assert (lo, hi) == pytest.approx(wilson_interval(1, 4)) and how == "Wilson"
    lo, hi, how = accuracy_interval([[1] * 7 + [0], [1] * 8], n_boot=20000)
    assert (lo, hi) == pytest.approx((0.8125, 1.0)) and "8 problems, 2 seeds" in how


def _cell(method, seed, nll, correct, kind="trained"):
    return {"method": method, "seed": seed, "type": kind,
            "per_example": {"test": {"nll": nll, "n_tokens": [1] * len(nll), "correct": correct}}}


def test_a_one_seed_trained_reference_is_paired_only_with_its_own_seed():
    # method m ran seeds 0 and 1; reference r (trained) ran seed 0 only. Seed 1 of m must not be
    # compared with r's seed 0 as if paired: the change uses seed 0 alone.
    cells = [_cell("m", 0, [1.0, 2.0], [1, 0]), _cell("m", 1, [5.0, 5.0], [0, 0]),
             _cell("r", 0, [1.5, 1.5], [0, 0])]
    r = ppl_change(cells, "m", "r", n_boot=200)
    assert r["seeds"] == [0] and r["of_seeds"] == 2
    assert r["change"] == pytest.approx(math.exp(3.0 / 2 - 3.0 / 2) - 1)  # seed 0: equal total NLL
    a = acc_change(cells, "m", "r", n_boot=200)
    assert a["seeds"] == [0] and a["change"] == pytest.approx(0.5)


def test_a_one_seed_arm_against_a_three_seed_reference_says_it_is_paired_on_one_seed():
    cells = [_cell("m", 0, [1.0, 2.0], [1, 0])] + [_cell("r", s, [1.5, 1.5], [0, 0]) for s in (0, 1, 2)]
    r = ppl_change(cells, "m", "r", n_boot=200)
    assert r["seeds"] == [0] and r["of_seeds"] == 3
    assert "(paired on seed 0 only)" in _fmt_change(r, pct=True)
    frozen = [_cell("m", 0, [1.0, 2.0], [1, 0]), _cell("frozen", 0, [2.0, 2.0], [0, 0], kind="frozen")]
    assert "paired on" not in _fmt_change(ppl_change(frozen, "m", "frozen", n_boot=200), pct=True)


def test_a_trained_reference_without_shared_seeds_gives_no_paired_change():
    cells = [_cell("m", 1, [1.0, 2.0], [1, 0]), _cell("r", 0, [1.5, 1.5], [0, 0])]
    assert ppl_change(cells, "m", "r") is None and acc_change(cells, "m", "r") is None


def test_the_frozen_base_evaluated_once_pairs_with_every_seed():
    cells = [_cell("m", 0, [1.0, 1.0], [1, 0]), _cell("m", 1, [3.0, 3.0], [1, 1]),
             _cell("frozen", 0, [2.0, 2.0], [0, 0], kind="frozen")]
    r = ppl_change(cells, "m", "frozen", n_boot=200)
    assert r["seeds"] == [0, 1]
    assert r["change"] == pytest.approx(((math.exp(-1) - 1) + (math.exp(1) - 1)) / 2)
    assert acc_change(cells, "m", "frozen", n_boot=200)["change"] == pytest.approx(0.75)
