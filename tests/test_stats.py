import itertools
import math

import numpy as np
import pytest

from attnlab.errors import ConfigError, DataError
from attnlab.stats import (bootstrap_ci, paired_bootstrap_diff, paired_bootstrap_diff_seeds, paired_bootstrap_ppl,
                           paired_bootstrap_ppl_seeds, t_quantile, t_quantile_975, wilson_interval, within_noise)


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
    half = 4.302653 * np.std([0.25, 0.0, 0.5], ddof=1) / math.sqrt(3)
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
    # published t_{0.975} values, and two other levels
    for dof, t in [(1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (30, 2.042), (60, 2.000), (120, 1.980)]:
        assert t_quantile_975(dof) == pytest.approx(t, abs=1e-3), dof
    assert t_quantile(0.995, 5) == pytest.approx(4.032, abs=1e-3)
    assert t_quantile(0.95, 1) == pytest.approx(6.314, abs=1e-3)
    assert t_quantile_975(5000) == pytest.approx(1.9604, abs=1e-4)
    assert wilson_interval(0, 10, alpha=0.10)[1] == pytest.approx(0.2129, abs=1e-4)


def test_the_ppl_bootstrap_of_two_examples_matches_a_hand_enumeration():
    # per-token NLL: A (2, 0), B (1, 1), one token each. Resamples (1,1), (1,2), (2,1), (2,2), each 1/4:
    # PPL_A/PPL_B - 1 = e^(2-1) - 1, 0, 0, e^(0-1) - 1; on both examples e^(1-1) - 1 = 0.
    r = paired_bootstrap_ppl([2.0, 0.0], [1, 1], [1.0, 1.0], [1, 1], n_boot=20000)
    assert r["change"] == 0.0
    assert r["lo"] == pytest.approx(math.exp(-1) - 1) and r["hi"] == pytest.approx(math.e - 1)


def test_bad_inputs_are_user_errors():
    with pytest.raises(DataError):
        paired_bootstrap_diff([1, 0], [1])
    with pytest.raises(DataError):
        paired_bootstrap_ppl_seeds([([1.0], [1], [1.0], [1]), ([1.0, 2.0], [1, 1], [1.0, 2.0], [1, 1])])
    with pytest.raises(DataError):
        bootstrap_ci([])
    with pytest.raises(ConfigError):
        paired_bootstrap_diff([1, 0], [0, 0], alpha=1.5)
    with pytest.raises(ConfigError):
        t_quantile_975(0)


def test_examples_without_target_tokens_are_dropped_from_the_ppl_bootstrap():
    with_empty = paired_bootstrap_ppl([3.0, 0.0, 5.0], [2, 0, 4], [2.0, 0.0, 6.0], [2, 0, 4])
    without = paired_bootstrap_ppl([3.0, 5.0], [2, 4], [2.0, 6.0], [2, 4])
    assert with_empty == without and with_empty["n_examples"] == 2


def test_a_90_percent_interval_is_inside_the_95_percent_one():
    rng = np.random.default_rng(0)
    a, b = rng.random(50) < 0.6, rng.random(50) < 0.5
    runs = [(a, b), (a, rng.random(50) < 0.4), (rng.random(50) < 0.7, b)]
    r95, r90 = paired_bootstrap_diff_seeds(runs), paired_bootstrap_diff_seeds(runs, alpha=0.10)
    assert r95["lo"] <= r90["lo"] <= r90["hi"] <= r95["hi"]
    assert r95["seed_lo"] < r90["seed_lo"] < r90["seed_hi"] < r95["seed_hi"]
    lo, est, hi = (bootstrap_ci(a.astype(float))[i] for i in (1, 0, 2))
    assert lo < est == a.mean() < hi
