import itertools
import math

import numpy as np
import pytest

from attnlab.stats import (bootstrap_ci, paired_bootstrap_diff, paired_bootstrap_diff_seeds, paired_bootstrap_ppl,
                           paired_bootstrap_ppl_seeds, t_quantile_975, wilson_interval, within_noise)


def test_identical_methods_change_by_exactly_zero_with_a_degenerate_interval():
    nll, ntok = [3.0, 5.0, 1.0], [2, 4, 1]
    r = paired_bootstrap_ppl(nll, ntok, nll, ntok, n_boot=500)
    assert r["change"] == 0.0 and r["lo"] == 0.0 and r["hi"] == 0.0 and within_noise(r["lo"], r["hi"])


def test_a_method_uniformly_10_percent_better_is_not_within_noise():
    rng = np.random.default_rng(1)
    ntok = rng.integers(5, 50, size=64)
    nll_b = ntok * rng.uniform(0.5, 2.5, size=64)
    nll_a = nll_b + ntok * math.log(0.9)  # every example's perplexity x 0.9
    r = paired_bootstrap_ppl(nll_a, ntok, nll_b, ntok)
    assert r["change"] == pytest.approx(-0.1) and r["hi"] < 0 and not within_noise(r["lo"], r["hi"])


def test_the_bootstrap_distribution_of_two_examples_matches_a_hand_enumeration():
    # examples: A right on #1 only, B on neither. Resamples of 2 from 2: (1,1), (1,2), (2,1), (2,2), each 1/4:
    # differences 1, 0.5, 0.5, 0 -> the 2.5% quantile is 0 and the 97.5% quantile is 1.
    r = paired_bootstrap_diff([1, 0], [0, 0], n_boot=20000)
    assert r["change"] == 0.5 and r["lo"] == 0.0 and r["hi"] == 1.0
    # and the bootstrap mean of the difference is the enumeration's mean, 0.5
    idx = np.random.default_rng(0).integers(0, 2, size=(20000, 2))
    assert np.mean(np.array([1, 0])[idx].mean(-1)) == pytest.approx(0.5, abs=0.01)
    enum = [np.mean([[1, 0][i] for i in c]) for c in itertools.product([0, 1], repeat=2)]
    assert sorted(enum) == [0.0, 0.5, 0.5, 1.0]


def test_seeds_average_and_get_a_t_interval():
    runs = [([1, 1, 0, 1], [0, 1, 0, 1]), ([1, 0, 0, 1], [0, 1, 0, 1]), ([1, 1, 1, 1], [0, 1, 0, 1])]
    r = paired_bootstrap_diff_seeds(runs, n_boot=500)
    assert r["seed_values"] == [0.25, 0.0, 0.5] and r["change"] == pytest.approx(0.25)
    half = 4.303 * np.std([0.25, 0.0, 0.5], ddof=1) / math.sqrt(3)
    assert r["seed_lo"] == pytest.approx(0.25 - half) and r["seed_hi"] == pytest.approx(0.25 + half)
    one = paired_bootstrap_ppl_seeds([([1.0, 2.0], [1, 1], [1.0, 2.0], [1, 1])])
    assert one["seed_lo"] is None


def test_intervals_are_deterministic_under_a_seed():
    a, b = np.arange(30) % 3 == 0, np.arange(30) % 4 == 0
    assert paired_bootstrap_diff(a, b, seed=3) == paired_bootstrap_diff(a, b, seed=3)
    assert bootstrap_ci([1, 2, 3, 4], seed=2) == bootstrap_ci([1, 2, 3, 4], seed=2)


def test_wilson_and_t_quantiles_against_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert t_quantile_975(2) == 4.303 and t_quantile_975(10) == 2.228
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 0], [1])
