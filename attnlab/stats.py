"""Confidence intervals for the differences a report shows.

Every method is scored on the same eval examples, so a difference between two methods is paired:
resampling examples (with replacement) and recomputing the difference on the same resampled
examples for both methods keeps the example-to-example variation, which is large (some problems
are hard for everyone), out of the difference's uncertainty. The percentile bootstrap gives the
(1 − alpha) interval of the statistic over B resamples (alpha = 0.05: 95%).

Seeds: each seed of a method is a separate training run, scored on the same examples. The
statistic is the mean over seeds of each seed's difference, and examples are resampled jointly
(the same indices for every seed), so the interval reflects which problems were drawn. The
variation between training runs is shown apart, as a Student-t interval over the per-seed
differences (n − 1 degrees of freedom); with one seed it is unknown. A difference is "within
noise" when an interval covers zero.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from .errors import ConfigError, DataError


def _t_two_sided(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's t with an integer `dof`, in closed form (Abramowitz & Stegun
    26.7.3-4): with θ = atan(t / √dof) and c = cos²θ,
      odd dof:  (2/π) (θ + sinθ cosθ (1 + (2/3) c + (2·4)/(3·5) c² + ... up to c^((dof−3)/2)))
      even dof: sinθ (1 + (1/2) c + (1·3)/(2·4) c² + ... up to c^((dof−2)/2))."""
    theta = math.atan(t / math.sqrt(dof))
    sin, c = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:
        total, term = 0.0, 1.0
        if dof > 1:
            total = term
            for k in range(1, (dof - 3) // 2 + 1):
                term *= c * (2 * k) / (2 * k + 1)
                total += term
        return 2 / math.pi * (theta + sin * math.cos(theta) * total)
    total, term = 1.0, 1.0
    for k in range(1, (dof - 2) // 2 + 1):
        term *= c * (2 * k - 1) / (2 * k)
        total += term
    return sin * total


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with `dof` degrees of freedom, without scipy:
    bisection on the exact two-sided CDF above, P(|T| <= t) = 2p − 1. Above 1000 dof the
    Cornish-Fisher expansion z + (z³ + z)/(4ν) + (5z⁵ + 16z³ + 3z)/(96ν²) (error < 1e-6 there)."""
    if int(dof) != dof or dof < 1:
        raise ConfigError(f"a t-interval needs at least two values (one degree of freedom), got dof={dof}")
    if not 0.5 <= p < 1:
        raise ConfigError(f"t_quantile: p must be in [0.5, 1), got {p}")
    dof = int(dof)
    if dof > 1000:
        z = NormalDist().inv_cdf(p)
        return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while _t_two_sided(hi, dof) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, dof) < target else (lo, mid)
    return (lo + hi) / 2


def t_quantile_975(dof: int) -> float:
    """t_{0.975, dof}: the half-width factor of a two-sided 95% t-interval."""
    return t_quantile(0.975, dof)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _check(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha} (0.05 for a 95% interval)")


def _percentile(xs: np.ndarray, alpha: float) -> tuple[float, float]:
    return float(np.quantile(xs, alpha / 2)), float(np.quantile(xs, 1 - alpha / 2))


def bootstrap_ci(values, stat=np.mean, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(stat(values), lo, hi): the percentile bootstrap interval of `stat`.

    The n values are taken as draws from an unknown distribution F; the empirical distribution
    (mass 1/n on each value) stands in for F, so stat's sampling distribution is approximated by
    stat over n_boot resamples of n values drawn with replacement. lo and hi are that
    distribution's alpha/2 and 1 − alpha/2 quantiles (linear interpolation). Deterministic given
    `seed`."""
    _check(n_boot, alpha)
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise DataError("bootstrap_ci needs at least one value")
    idx = _rng(seed).integers(0, v.size, size=(n_boot, v.size))
    boots = np.array([stat(v[i]) for i in idx])
    return (float(stat(v)), *_percentile(boots, alpha))


def t_interval(values, alpha: float = 0.05) -> tuple[float | None, float | None]:
    """mean ± t_{1−alpha/2, n−1} · s / √n over n values (s: sample SD), e.g. one per seed or per
    held-out text; (None, None) for one value, where the variation between them is unknown."""
    if len(values) < 2:
        return None, None
    m, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = t_quantile(1 - alpha / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return m - half, m + half


def paired_bootstrap_ppl_seeds(runs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Relative change of corpus perplexity, PPL_A / PPL_B − 1, averaged over seeds.

    runs: one (nll_a, ntok_a, nll_b, ntok_b) per seed: per-example summed NLL and target-token
    counts of A and B on the same n examples (`score(...)['per_example']`). Corpus perplexity is
    PPL = exp(Σ nll / Σ ntok), so for seed s, D_s = exp(Σnll_a/Σntok_a − Σnll_b/Σntok_b) − 1.
    The statistic is D = mean_s D_s.

    Interval: one resample is n example indices drawn with replacement; the same indices are used
    for A and B (paired: an example hard for both moves both sums) and for every seed (all are
    scored on the same examples), and D is recomputed on them; lo, hi are the alpha/2 and
    1 − alpha/2 quantiles over n_boot resamples. Examples with no target tokens in any run are
    dropped first (they add nothing to either sum).

    Returns {"change": D on all examples, "lo", "hi", "seed_values": [D_s], "seed_lo", "seed_hi":
    the t-interval mean ± t_{1−alpha/2, S−1}·sd/√S over the S seeds' D_s (None for one seed),
    "n_examples", "n_boot"}."""
    _check(n_boot, alpha)
    arrs = [tuple(np.asarray(x, dtype=np.float64).reshape(-1) for x in r) for r in runs]
    if not arrs:
        raise DataError("no runs to compare")
    if any(len(r) != 4 for r in arrs):
        raise DataError("each run is (nll_a, ntok_a, nll_b, ntok_b)")
    n = arrs[0][0].size
    if n == 0 or any(a.size != n for r in arrs for a in r):
        raise DataError("every seed of A and B must be scored on the same, non-empty set of examples")
    used = np.zeros(n, dtype=bool)
    for r in arrs:
        used |= (r[1] > 0) | (r[3] > 0)
    if not used.any():
        raise DataError("the examples have no target tokens")
    arrs = [tuple(x[used] for x in r) for r in arrs]
    n = int(used.sum())

    def change(r, idx=None):
        na, ta, nb, tb = (x if idx is None else x[idx] for x in r)
        return math.exp(na.sum() / ta.sum() - nb.sum() / tb.sum()) - 1.0 if idx is None else \
            np.exp(na.sum(-1) / ta.sum(-1) - nb.sum(-1) / tb.sum(-1)) - 1.0

    seed_values = [change(r) for r in arrs]
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    boots = np.mean([change(r, idx) for r in arrs], axis=0)
    lo, hi = _percentile(boots, alpha)
    s_lo, s_hi = t_interval(seed_values, alpha)
    return {"change": float(np.mean(seed_values)), "lo": lo, "hi": hi, "seed_values": seed_values,
            "seed_lo": s_lo, "seed_hi": s_hi, "n_examples": n, "n_boot": n_boot}


def paired_bootstrap_ppl(nll_a, ntok_a, nll_b, ntok_b, n_boot: int = 2000, alpha: float = 0.05,
                         seed: int = 0) -> dict:
    """`paired_bootstrap_ppl_seeds` with one seed: change = PPL_A / PPL_B − 1 on all examples and
    its paired percentile-bootstrap interval lo, hi (seed_lo, seed_hi are None)."""
    return paired_bootstrap_ppl_seeds([(nll_a, ntok_a, nll_b, ntok_b)], n_boot=n_boot, alpha=alpha, seed=seed)


def paired_bootstrap_diff_seeds(runs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Difference of means, D_s = mean(a_s) − mean(b_s), of per-example values (e.g. 0/1 answer
    correctness: D is then in accuracy points as a fraction) averaged over seeds, D = mean_s D_s.

    runs: one (a, b) per seed, value i of each on example i (the same n examples everywhere).
    The interval resamples example indices exactly as `paired_bootstrap_ppl_seeds` does (the same
    indices for A, B and every seed). Returns the same keys: change, lo, hi, seed_values,
    seed_lo, seed_hi, n_examples, n_boot."""
    _check(n_boot, alpha)
    arrs = [(np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1))
            for a, b in runs]
    if not arrs:
        raise DataError("no runs to compare")
    n = arrs[0][0].size
    if n == 0 or any(x.size != n for r in arrs for x in r):
        raise DataError("every seed of A and B must be scored on the same, non-empty set of examples")
    seed_values = [float(a.mean() - b.mean()) for a, b in arrs]
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    boots = np.mean([a[idx].mean(-1) - b[idx].mean(-1) for a, b in arrs], axis=0)
    lo, hi = _percentile(boots, alpha)
    s_lo, s_hi = t_interval(seed_values, alpha)
    return {"change": float(np.mean(seed_values)), "lo": lo, "hi": hi, "seed_values": seed_values,
            "seed_lo": s_lo, "seed_hi": s_hi, "n_examples": n, "n_boot": n_boot}


def paired_bootstrap_diff(a, b, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """`paired_bootstrap_diff_seeds` with one seed: change = mean(a) − mean(b) and its paired
    percentile-bootstrap interval lo, hi (seed_lo, seed_hi are None)."""
    return paired_bootstrap_diff_seeds([(a, b)], n_boot=n_boot, alpha=alpha, seed=seed)


def bootstrap_mean_seeds(runs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """The mean of per-example values (e.g. 0/1 answer correctness) over several seeds' runs on the
    same n examples, with an interval whose unit is the example.

    runs: one array per seed, value i of each on example i. The statistic is the mean over seeds
    of each seed's mean, A = mean_s mean_i x_si = mean_i x̄_i with x̄_i the example's mean over
    seeds. Seeds are averaged inside an example, not pooled as S·n independent draws: the seeds
    answer the same problems, so an easy problem is right in every seed, and pooling would count
    it S times (an interval too narrow by up to √S). One resample draws n example indices with
    replacement (the same for every seed) and recomputes A; lo, hi are its alpha/2 and 1 − alpha/2
    quantiles. With one seed use `wilson_interval` (the exact-coverage choice for a proportion).

    Returns {"value", "lo", "hi", "n_examples", "n_seeds", "n_boot"}."""
    _check(n_boot, alpha)
    arrs = [np.asarray(a, dtype=np.float64).reshape(-1) for a in runs]
    if not arrs:
        raise DataError("no runs to average")
    n = arrs[0].size
    if n == 0 or any(a.size != n for a in arrs):
        raise DataError("every seed must be scored on the same, non-empty set of examples")
    per_example = np.mean(arrs, axis=0)                           # x̄_i: the example's mean over seeds
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    lo, hi = _percentile(per_example[idx].mean(-1), alpha)
    return {"value": float(per_example.mean()), "lo": lo, "hi": hi, "n_examples": n, "n_seeds": len(arrs),
            "n_boot": n_boot}


def within_noise(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] covers zero."""
    return lo <= 0.0 <= hi


def wilson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n: the p with |k/n − p| <= z·√(p(1−p)/n),
    z = Φ⁻¹(1 − alpha/2). Solving that quadratic in p gives
      (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),   p̂ = k/n,
    which, unlike p̂ ± z·√(p̂(1−p̂)/n), stays inside [0, 1] and is not empty at k = 0 or k = n."""
    if n <= 0 or not 0 <= k <= n:
        raise DataError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # the bounds at k = 0 and k = n are exactly 0 and 1 (rounding aside)
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))
