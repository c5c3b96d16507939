"""Density against quality of sparse selectors, read on held-out sequences: per point (a selector at
a budget) and sequence the records NLL, tokens, correct, KL(dense || sparse), top-1 agreement and
density; then per point the perplexity change against dense with a paired percentile-bootstrap 95%
interval over sequences, and selector A against B AT EQUAL DENSITY: per sequence each selector's NLL
per token interpolated linearly in density between its budgets, d = NLL_A - NLL_B, change =
exp(mean d) - 1 with a bootstrap and a t-interval (outside noise only when both exclude zero).

The one summary behind benchmarks/sparse_quality.py and `attnlab run`'s distilled gate (recipe.py).
The data: {"meta": {"length": T}, "points": {key: {"selector", "budget", "sequences": {index: record}}},
"metrics": ..., "gate": ...}.
"""

from __future__ import annotations

import math

import numpy as np

from ...stats import bootstrap_ci, paired_bootstrap_ppl, t_interval

SELECTORS = ("window", "quest", "learned", "learned-mass", "oracle", "oracle-qhead", "lowrank")
COMPARE = [("learned", "quest"), ("learned", "window"), ("learned-mass", "quest"), ("quest", "window"),
           ("oracle", "learned"), ("oracle-qhead", "oracle"), ("lowrank", "quest"), ("lowrank", "learned"),
           ("oracle-qhead", "lowrank")]
DENSITIES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
MIN_SEQUENCES = 2          # below this, no interval and no comparison


# read when no selectors are named: every one but oracle-qhead (an analysis selector; at granularity block it
# is the oracle itself) and lowrank (added after them): read only when named, so that the committed runs' own
# commands reproduce without them
DEFAULT_SELECTORS = tuple(s for s in SELECTORS if s not in ("oracle-qhead", "lowrank"))


def budgets(block: int) -> dict[str, list[dict]]:
    """Each selector's budgets: windows of 1, 2, 4, 8 blocks + 4 sinks; quest, learned, lowrank and the oracles with
    k = 1, 2, 4, 8 extra blocks; learned by cumulative mass 0.5..0.95."""
    return {"window": [{"window": w * block, "sinks": 4} for w in (1, 2, 4, 8)],
            "quest": [{"top_k": k} for k in (1, 2, 4, 8)],
            "learned": [{"top_k": k} for k in (1, 2, 4, 8)],
            "learned-mass": [{"mass": m} for m in (0.5, 0.7, 0.9, 0.95)],
            "oracle": [{"top_k": k} for k in (1, 2, 4, 8)],
            "oracle-qhead": [{"top_k": k} for k in (1, 2, 4, 8)],
            "lowrank": [{"top_k": k} for k in (1, 2, 4, 8)]}


def key(selector: str, budget: dict) -> str:
    return selector + ":" + ",".join(f"{k}={v}" for k, v in budget.items())


def complete(data: dict) -> list[str]:
    """The held-out sequences read by dense and by every budget: every summary and comparison uses
    exactly these (a run stopped mid-sequence leaves that sequence out until it is finished)."""
    common = set(data["points"].get("dense", {}).get("sequences", {}))
    for p in data["points"].values():
        common &= set(p["sequences"])
    return sorted(common, key=int)


def summarise(data: dict, pairs=None, densities=None) -> None:
    """Per point, on the complete sequences: totals, perplexity, and the change against dense with a
    paired percentile-bootstrap 95% interval over sequences (the sequence is the unit resampled:
    tokens of one text are not independent draws). Then the comparisons at equal density."""
    for p in data.get("points", {}).values():      # a summary is always of the current complete sequences
        p.pop("summary", None)
    data.pop("comparisons", None)
    seqs = complete(data)
    if not seqs:
        return
    dense = data["points"]["dense"]["sequences"]
    for name, p in data["points"].items():
        rs = [p["sequences"][i] for i in seqs]
        tot = {k: sum(r.get(k, 0) for r in rs) for k in ("tokens", "nll", "correct", "kl", "agree")}
        dtot = {k: sum(dense[i][k] for i in seqs) for k in ("tokens", "nll", "correct")}
        ppl, dppl = math.exp(tot["nll"] / tot["tokens"]), math.exp(dtot["nll"] / dtot["tokens"])
        if name == "dense":
            ci = {"lo": 0.0, "hi": 0.0}
        elif len(seqs) < MIN_SEQUENCES:              # one text: no spread to resample, so no interval
            ci = {"lo": None, "hi": None}
        else:
            ci = paired_bootstrap_ppl([r["nll"] for r in rs], [r["tokens"] for r in rs],
                                      [dense[i]["nll"] for i in seqs], [dense[i]["tokens"] for i in seqs])
        p["summary"] = {"sequences": len(rs), "tokens": tot["tokens"],
                        "density": sum(r["density"] for r in rs) / len(rs),
                        "work": (sum(r["work"] for r in rs) / len(rs) if all("work" in r for r in rs) else None),
                        "ppl": ppl, "ppl_change": ppl / dppl - 1, "ppl_change_lo": ci["lo"], "ppl_change_hi": ci["hi"],
                        "kl": tot["kl"] / tot["tokens"],
                        "top1_agree": tot["agree"] / tot["tokens"] if name != "dense" else 1.0,
                        "accuracy": tot["correct"] / tot["tokens"],
                        "accuracy_vs_dense": tot["correct"] / max(dtot["correct"], 1)}
    data["comparisons"] = compare(data, seqs, pairs, densities) if len(seqs) >= MIN_SEQUENCES else []


def at_density(data: dict, selector: str, target: float, seqs: list[str]):
    """Per sequence, the selector's NLL per token at density `target`: linear in density between the
    two of its budgets that bracket the target on that sequence. None when any sequence's budgets do
    not reach the target (no extrapolation)."""
    out = []
    for si in seqs:
        pts = sorted((p["sequences"][si]["density"], p["sequences"][si]["nll"] / p["sequences"][si]["tokens"])
                     for p in data["points"].values() if p.get("selector") == selector)
        if not pts or not pts[0][0] <= target <= pts[-1][0]:
            return None
        out.append(float(np.interp(target, [d for d, _ in pts], [v for _, v in pts])))
    return np.array(out)


def compare(data: dict, seqs: list[str], pairs=None, densities=None) -> list[dict]:
    """A against B at equal density: per sequence, the difference of their interpolated NLL per token
    (every sequence has the same number of tokens); change = exp(mean difference) - 1 is A's
    perplexity over B's, with a percentile-bootstrap 95% interval over sequences and a t-interval
    (mean ± t·sd/√n of the differences, then exp − 1). With few sequences the bootstrap cannot see
    more spread than those texts show and is too narrow; the report calls a difference outside noise
    only when both intervals exclude zero."""
    rows = []
    for a, b in COMPARE if pairs is None else pairs:
        for target in DENSITIES if densities is None else densities:
            va = at_density(data, a, target, seqs)
            vb = dense_nll(data, seqs) if b == "dense" else at_density(data, b, target, seqs)
            if va is not None and vb is not None:
                rows.append({"a": a, "b": b, "density": target, **paired_change(va - vb)})
    return rows


def dense_mismatch(a: dict, b: dict, rtol: float = 1e-3) -> str | None:
    """The first sequence both runs read whose dense NLL differs by more than rtol (relative), or
    None: two runs merged into one comparison must have read the same tokens with the same model."""
    ours = a["points"]["dense"]["sequences"]
    for si, r in b["points"]["dense"]["sequences"].items():
        d = ours.get(si)
        if d is not None and abs(d["nll"] - r["nll"]) > rtol * abs(d["nll"]):
            return si
    return None


def dense_nll(data: dict, seqs: list[str]):
    """Per sequence, the dense model's NLL per token (B = "dense" in a comparison: A at the density
    against the unchanged model)."""
    dense = data["points"]["dense"]["sequences"]
    return np.array([dense[si]["nll"] / dense[si]["tokens"] for si in seqs])


def paired_change(d) -> dict:
    """Per-sequence differences of NLL per token -> change = exp(mean d) - 1, its percentile-bootstrap
    and t 95% intervals over sequences, and on how many sequences A was better."""
    change, lo, hi = bootstrap_ci(d, stat=lambda x: math.exp(float(np.mean(x))) - 1)
    t_lo, t_hi = (math.exp(x) - 1 for x in t_interval(d))
    return {"change": change, "lo": lo, "hi": hi, "t_lo": t_lo, "t_hi": t_hi,
            "a_better_on": int((d < 0).sum()), "sequences": len(d)}


def _interval(lo, hi) -> str:
    return "" if lo is None else f"[{lo * 100:+.1f}, {hi * 100:+.1f}]"


def report(data: dict) -> str:
    """Markdown: one row per budget (sorted by selector, then density), and the proposal's targets."""
    n = data["points"].get("dense", {}).get("summary", {}).get("sequences", 0)
    if not n:
        return "no held-out sequence has been read by every budget yet: nothing to report"
    lines = [f"{n} held-out sequences of {data['meta']['length']} tokens; intervals: 95% paired bootstrap over sequences"
             f"{'' if n >= MIN_SEQUENCES else ' (none: fewer than 2 sequences)'}.", "",
             "| selector | budget | density | work | PPL | vs dense [95% CI] | KL(dense‖sparse) | top-1 = dense | accuracy ÷ dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(p["selector"], p["budget"], p["summary"]) for p in data["points"].values() if "summary" in p]
    order = list(SELECTORS)
    rows.sort(key=lambda r: (r[0] != "dense", order.index(r[0]) if r[0] in order else -1, r[2]["density"]))
    for sel, budget, m in rows:
        b = ", ".join(f"{k} {v}" for k, v in budget.items()) or "–"
        work = f"{m['work']:.2f}" if m.get("work") is not None else "–"
        lines.append(f"| {sel} | {b} | {m['density']:.3f} | {work} | {m['ppl']:.2f} | {m['ppl_change'] * 100:+.1f}% "
                     f"{_interval(m['ppl_change_lo'], m['ppl_change_hi'])} | "
                     f"{m['kl']:.4f} | {m['top1_agree']:.3f} | {m['accuracy_vs_dense']:.3f} |")
    if data.get("comparisons"):
        lines += ["", "At equal density (each selector's NLL per token interpolated linearly in density between its "
                  "budgets, per sequence; A ÷ B − 1 in perplexity, negative: A is better):", "",
                  "| A | B | density | A vs B [bootstrap 95%] | t-interval 95% | A better on |",
                  "|---|---|---:|---:|---:|---:|"]
        for c in data["comparisons"]:
            noise = c["lo"] <= 0 <= c["hi"] or c["t_lo"] <= 0 <= c["t_hi"]
            lines.append(f"| {c['a']} | {c['b']} | {c['density']:.2f} | {c['change'] * 100:+.2f}% "
                         f"[{c['lo'] * 100:+.2f}, {c['hi'] * 100:+.2f}] | [{c['t_lo'] * 100:+.2f}, {c['t_hi'] * 100:+.2f}]"
                         f"{' (within noise)' if noise else ''} | {c['a_better_on']}/{c['sequences']} |")
    per_seq = {k: v for k, v in data.get("metrics", {}).items() if isinstance(v, dict) and ":" in k
               and all(isinstance(r, dict) for r in v.values())}
    common = sorted(set.intersection(*(set(v) for v in per_seq.values())), key=int) if per_seq else []
    if common:
        per_seq = {k: {i: v[i] for i in common} for k, v in per_seq.items()}
        lines += ["", "Attention MSE over causal entries and gradient cosine (the patched attention weights' "
                  f"cross-entropy gradient, dense vs sparse), per held-out sequence (sequences {', '.join(common)}: "
                  "those every selector has read):", "",
                  "| selector | budget | sequences | attention MSE (mean) | gradient cosine mean | min | ≥ 0.95 on |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for k, v in per_seq.items():
            mse = [r["attention_mse"] for r in v.values()]
            cos = [r["grad_cosine"] for r in v.values()]
            lines.append(f"| {k.split(':')[0]} | {k.split(':')[1]} | {len(v)} | {sum(mse) / len(mse):.3g} | "
                         f"{sum(cos) / len(cos):.4f} | {min(cos):.4f} | {sum(c >= 0.95 for c in cos)}/{len(cos)} |")
    fit = data.get("lowrank") or (data.get("gate") or {}).get("calibrate")    # benchmark, or `attnlab run`
    if fit:
        lines += ["", f"Lowrank indexer fit: one dense pass, {fit['seconds']:.0f} s for {fit['tokens']} tokens "
                  f"({fit['seconds'] / fit['tokens'] * 1e3:.1f} ms/token); nothing trained."]
    if data.get("gate") and "calibrate" not in data["gate"]:
        g = data["gate"]
        lines += ["", f"Gate distillation: teacher pass {g['teacher_seconds']:.0f} s for {g['tokens']} tokens "
                  f"({g['teacher_seconds_per_token'] * 1e3:.1f} ms/token), gate training {g['training_seconds']:.0f} s "
                  f"({g['training_seconds_per_token'] * 1e3:.1f} ms/token)."]
        kl = [(r["before"]["heldout"], r["after"]["heldout"]) for r in g["layers"].values()]
        lines.append(f"Held-out KL(target ‖ gate), mean over layers: {sum(a for a, _ in kl) / len(kl):.3f} → "
                     f"{sum(b for _, b in kl) / len(kl):.3f}.")
    return "\n".join(lines)
