"""Confidence intervals for the differences a report shows.

Every method is scored on the same eval examples, so a difference between two methods is paired:
resampling examples (with replacement) and recomputing the difference on the same resampled
examples for both methods keeps the example-to-example variation, which is large (some problems
are hard for everyone), out of the difference's uncertainty. The percentile bootstrap gives the
95% interval of the statistic over B resamples.

Seeds: each seed of a method is a separate training run, scored on the same examples. The
statistic is the mean over seeds of each seed's difference, and examples are resampled jointly
(the same indices for every seed), so the interval reflects which problems were drawn. The
variation between training runs is shown apart, as a Student-t interval over the per-seed
differences (n − 1 degrees of freedom); with one seed it is unknown. A difference is "within
noise" when an interval covers zero.
"""

from __future__ import annotations

import math

import numpy as np

# two-sided 95% Student t quantiles t_{0.975, dof}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t_quantile_975(dof: int) -> float:
    """t_{0.975} with `dof` degrees of freedom (table to 30, then the normal limit with a 1/dof term)."""
    if dof < 1:
        raise ValueError("a t-interval needs at least two values (one degree of freedom)")
    return _T975.get(dof, 1.959964 + 2.4 / dof)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _percentile(xs: np.ndarray, alpha: float) -> tuple[float, float]:
    return float(np.quantile(xs, alpha / 2)), float(np.quantile(xs, 1 - alpha / 2))


def bootstrap_ci(values, stat=np.mean, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
    """(stat(values), lo, hi): the percentile bootstrap interval of `stat` over the values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    idx = _rng(seed).integers(0, v.size, size=(n_boot, v.size))
    boots = np.array([stat(v[i]) for i in idx])
    return (float(stat(v)), *_percentile(boots, alpha))


def _seed_t(values: list[float], alpha: float = 0.05) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return None, None
    if alpha != 0.05:
        raise ValueError("only 95% t-intervals are tabulated")
    m, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return m - half, m + half


def paired_bootstrap_ppl_seeds(runs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Relative change of corpus perplexity, PPL_A / PPL_B − 1, averaged over seeds.

    runs: one (nll_a, ntok_a, nll_b, ntok_b) per seed: per-example summed NLL and target-token
    counts of A and B on the same examples. PPL = exp(Σ nll / Σ ntok) over the (resampled)
    examples. Returns change (on all examples), lo, hi (paired bootstrap, examples resampled
    jointly across seeds), seed_values (each seed's change) and seed_lo, seed_hi (t-interval over
    seeds; None for one seed)."""
    arrs = [tuple(np.asarray(x, dtype=np.float64) for x in r) for r in runs]
    if not arrs:
        raise ValueError("no runs to compare")
    n = arrs[0][0].size
    if n == 0 or any(a.size != n for r in arrs for a in r):
        raise ValueError("every seed must be scored on the same, non-empty set of examples")

    def change(r, idx=None):
        na, ta, nb, tb = (x if idx is None else x[idx] for x in r)
        return math.exp(na.sum() / ta.sum() - nb.sum() / tb.sum()) - 1.0 if idx is None else \
            np.exp(na.sum(-1) / ta.sum(-1) - nb.sum(-1) / tb.sum(-1)) - 1.0

    seed_values = [change(r) for r in arrs]
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    boots = np.mean([change(r, idx) for r in arrs], axis=0)
    lo, hi = _percentile(boots, alpha)
    s_lo, s_hi = _seed_t(seed_values, alpha)
    return {"change": float(np.mean(seed_values)), "lo": lo, "hi": hi, "seed_values": seed_values,
            "seed_lo": s_lo, "seed_hi": s_hi, "n_examples": n, "n_boot": n_boot}


def paired_bootstrap_ppl(nll_a, ntok_a, nll_b, ntok_b, **kw) -> dict:
    """One seed of `paired_bootstrap_ppl_seeds`."""
    return paired_bootstrap_ppl_seeds([(nll_a, ntok_a, nll_b, ntok_b)], **kw)


def paired_bootstrap_diff_seeds(runs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Difference of means, mean(A) − mean(B), of per-example values (e.g. 0/1 answer correctness)
    averaged over seeds; runs: one (a, b) per seed on the same examples. Same keys as the PPL
    version."""
    arrs = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in runs]
    if not arrs:
        raise ValueError("no runs to compare")
    n = arrs[0][0].size
    if n == 0 or any(x.size != n for r in arrs for x in r):
        raise ValueError("every seed must be scored on the same, non-empty set of examples")
    seed_values = [float(a.mean() - b.mean()) for a, b in arrs]
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    boots = np.mean([a[idx].mean(-1) - b[idx].mean(-1) for a, b in arrs], axis=0)
    lo, hi = _percentile(boots, alpha)
    s_lo, s_hi = _seed_t(seed_values, alpha)
    return {"change": float(np.mean(seed_values)), "lo": lo, "hi": hi, "seed_values": seed_values,
            "seed_lo": s_lo, "seed_hi": s_hi, "n_examples": n, "n_boot": n_boot}


def paired_bootstrap_diff(a, b, **kw) -> dict:
    """One seed of `paired_bootstrap_diff_seeds`."""
    return paired_bootstrap_diff_seeds([(a, b)], **kw)


def within_noise(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] covers zero."""
    return lo <= 0.0 <= hi


def wilson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95%): sensible at k = 0 and k = n."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if alpha != 0.05:
        raise ValueError("only 95% intervals are tabulated")
    z = 1.959964
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)
