"""The report's differences with confidence intervals: a method against a reference (the frozen base,
or a trained baseline such as LoRA), paired by seed, and answer accuracy with an interval whose
unit is the problem.

Pairing: seed s of a method is compared with seed s of a trained reference, on the same examples
(`stats.paired_bootstrap_*_seeds`: examples resampled jointly for every seed). The frozen base is
not trained: its one deterministic evaluation pairs with every seed. A trained reference that did
not run seed s gives no pair for s, and a change covering fewer seeds than the method ran says so.
"""

from __future__ import annotations

def _per_seed(cells: list[dict], name: str) -> dict:
    return {c["seed"]: c for c in cells if c["method"] == name}


def _frozen(runs: dict) -> bool:
    """A reference's seed -> cell map is the frozen base's: one deterministic evaluation, paired with every seed."""
    return len(runs) == 1 and next(iter(runs.values())).get("type") == "frozen"


def _pairs(cells, name, ref, set_name, key):
    """Per-seed (a, b) per-example arrays of `key` for method `name` against `ref`, paired by seed:
    seed s of `name` against seed s of `ref`. The one exception is a frozen reference, which is not
    trained: its single (deterministic) evaluation is the same model for every seed. A trained
    reference that did not run seed s gives no pair for s (never another seed's run: that would be
    an unpaired comparison presented as a paired one), so the result covers only the shared seeds."""
    a, b = _per_seed(cells, name), _per_seed(cells, ref)
    frozen = _frozen(b)
    out = []
    for seed, ca in sorted(a.items()):
        cb = next(iter(b.values())) if frozen else b.get(seed)
        if cb is None:
            continue
        pa, pb = ca.get("per_example", {}).get(set_name, {}), cb.get("per_example", {}).get(set_name, {})
        if all(k in pa and k in pb for k in key):
            out.append((seed, [pa[k] for k in key], [pb[k] for k in key]))
    return out


def _seeds_run(cells, name, ref) -> int:
    """The most seeds either side ran (a frozen reference runs once and pairs with every seed): a change
    paired on fewer says so, whichever side ran more (a 1-seed arm against a 3-seed reference is seed 0's)."""
    b = _per_seed(cells, ref)
    return max(len(_per_seed(cells, name)), 0 if _frozen(b) else len(b))


def ppl_change(cells, name, ref, set_name="test", n_boot=2000) -> dict | None:
    """Relative change of corpus perplexity of `name` against `ref` on one set, with its 95% CI."""
    from .stats import paired_bootstrap_ppl_seeds

    pairs = _pairs(cells, name, ref, set_name, ("nll", "n_tokens"))
    if not pairs:
        return None
    r = paired_bootstrap_ppl_seeds([(a[0], a[1], b[0], b[1]) for _, a, b in pairs], n_boot=n_boot)
    return {**r, "seeds": [s for s, *_ in pairs], "of_seeds": _seeds_run(cells, name, ref)}


def acc_change(cells, name, ref, set_name="test", n_boot=2000) -> dict | None:
    """Difference of answer accuracy (percentage points) of `name` against `ref`, with its 95% CI."""
    from .stats import paired_bootstrap_diff_seeds

    pairs = _pairs(cells, name, ref, set_name, ("correct",))
    if not pairs:
        return None
    r = paired_bootstrap_diff_seeds([(a[0], b[0]) for _, a, b in pairs], n_boot=n_boot)
    return {**r, "seeds": [s for s, *_ in pairs], "of_seeds": _seeds_run(cells, name, ref)}


def _noise(r: dict) -> bool:
    from .stats import within_noise

    return within_noise(r["lo"], r["hi"]) or (r.get("seed_lo") is not None and within_noise(r["seed_lo"], r["seed_hi"]))


def _fmt_change(r: dict | None, pct: bool) -> str:
    if r is None:
        return "–"
    k = 100.0
    unit = "%" if pct else " pp"
    txt = f"{k * r['change']:+.1f}{unit} [{k * r['lo']:+.1f}, {k * r['hi']:+.1f}]"
    if r.get("seed_lo") is not None:
        txt += f" (seeds [{k * r['seed_lo']:+.1f}, {k * r['seed_hi']:+.1f}])"
    if r.get("seeds") and len(r["seeds"]) < r.get("of_seeds", 0):  # a reference that ran fewer seeds
        txt += f" (paired on seed{'s' * (len(r['seeds']) > 1)} {', '.join(map(str, r['seeds']))} only)"
    return txt + (" *within noise*" if _noise(r) else (" **better**" if (r["change"] < 0) == pct else " **worse**"))


def _set_names(results: dict) -> list[str]:
    return ["test"] + list(results.get("eval_sets", {}))


def accuracy_interval(arrs: list, n_boot: int = 2000) -> tuple[float, float, str]:
    """(lo, hi, how) of the answer accuracy of one method and decoding from per-seed 0/1 arrays on the
    same problems: Wilson for one seed; for several, a bootstrap over problems with the seeds
    averaged inside each problem (the problem is the unit: pooling S seeds x n problems as S·n
    independent answers would be too narrow by up to √S)."""
    from .stats import bootstrap_mean_seeds, wilson_interval

    if len(arrs) == 1 or any(len(a) != len(arrs[0]) for a in arrs):
        k, n = int(sum(sum(a) for a in arrs)), sum(len(a) for a in arrs)
        return (*wilson_interval(k, n), "Wilson") if n else (float("nan"), float("nan"), "–")
    r = bootstrap_mean_seeds(arrs, n_boot=n_boot)
    return r["lo"], r["hi"], f"bootstrap over {r['n_examples']} problems, {len(arrs)} seeds averaged"


def decoding_lines(results: dict, n_boot: int = 2000) -> list[str]:
    """Per set with a decoding grid: answer accuracy per method and decoding (greedy, sampled) over
    seeds with its 95% interval (`accuracy_interval`: Wilson for one seed, a bootstrap over problems
    with seeds averaged inside for several), and the paired change against the frozen base's greedy
    answers to the same problems (bootstrap over problems, seeds averaged)."""
    from .stats import paired_bootstrap_diff_seeds

    lines = []
    for s in _set_names(results):
        rows: dict[tuple[str, str], list] = {}
        for c in results["cells"]:
            ev = c["eval"] if s == "test" else c.get("eval_sets", {}).get(s, {})
            greedy = c.get("per_example", {}).get(s, {}).get("correct")
            if greedy is not None:
                rows.setdefault((c["method"], "greedy"), []).append(greedy)
            for x in ev.get("sampling") or []:
                rows.setdefault((c["method"], f"T={x['temperature']:g}, top-k={x['top_k'] or 'off'}"), []).append(
                    x["correct"])
        if all(d == "greedy" for _, d in rows):
            continue
        ref = rows.get(("frozen", "greedy"))
        lines += ["", f"### Decoding on `{s}`", "",
                  "Answer accuracy over seeds with its 95% interval (one seed: Wilson; several: a bootstrap over "
                  "problems with the seeds averaged inside each problem, the problem being the unit); change "
                  "against the frozen base's greedy answers to the same problems [paired bootstrap 95%].", "",
                  "| method | decoding | accuracy | [95% CI] | interval | Δ vs frozen greedy (pp) |",
                  "|---|---|---:|---|---|---|"]
        for (name, dec), arrs in rows.items():
            k, n = int(sum(sum(a) for a in arrs)), sum(len(a) for a in arrs)
            lo, hi, how = accuracy_interval(arrs, n_boot)
            d = "–"
            if ref and (name, dec) != ("frozen", "greedy") and all(len(a) == len(ref[0]) for a in arrs):
                d = _fmt_change(paired_bootstrap_diff_seeds([(a, ref[0]) for a in arrs], n_boot=n_boot), False)
            lines.append(f"| {name} | {dec} | {k}/{n} = {k / max(n, 1):.3f} | [{lo:.3f}, {hi:.3f}] | {how} | {d} |")
    return lines
