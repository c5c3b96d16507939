"""The cells of docs/sparse_attention.md's issue-13 verdict and the tables beside it, computed from the
committed results (sparse_memory.json, sparse_kernel.json, sparse_quality_<length>.json,
sparse_speed_flex.json), so a verdict can only change with the numbers it rests on.

Memory: a variant's ratio at a length is its training-step peak over dense SDPA's; the goal is
≤ 0.7× at every length, and the floor (an "attention" that keeps nothing) bounds every kernel from
below. Time: the median over layers of CPU-time ratios to SDPA, as the kernel table prints it; the
goal is ≤ 0.4× at 4096 tokens. Density ≤ 0.25 is ≥ 75% block sparsity; sparsity is 1 − density.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..errors import DataError
from .bench import _kernel_ratio
from .sparse import _budget, _quality, sparse_compare
from .tables import _json, _mark

MEMORY_GOAL, TIME_GOAL = 0.7, 0.4
MEMORY_VARIANTS = ("window 256 + 4 sinks", "quest top-4", "learned top-4")
FLOOR = "floor (attention keeps nothing)"


def _short(variant: str) -> str:
    return "window" if variant.startswith("window") else variant


def _marks(ok: dict[str, bool]) -> str:
    """{'window': True, 'quest': False, 'learned': False} -> '✔ window; ✘ quest, learned'; all alike: the mark."""
    if len(set(ok.values())) == 1:
        return _mark(next(iter(ok.values())))
    return "; ".join(f"{_mark(m)} {', '.join(k for k, v in ok.items() if v == m)}" for m in (True, False))


def sparse_memory_goal(root: Path, arg: str) -> str:
    """`measured`: each sparse variant's peak-memory ratio per length and the floor's; `met`: the mark
    with the floor; `gap`: how far the variants miss ≤ 0.7×; `floor`: the floor's largest ratio;
    `per_token`: dense SDPA's and the floor's peaks at the longest length per token and layer, as
    fp32 numbers, and the difference (what the attention's inputs and output take)."""
    d = _json(root, "benchmarks/results/sparse_memory.json")
    lens = sorted({r["tokens"] for r in d["rows"]})
    peak = {(r["variant"], r["tokens"]): r["peak_MiB"] for r in d["rows"]}
    x = {v: [peak[(v, n)] / peak[("dense-sdpa", n)] for n in lens] for v in (*MEMORY_VARIANTS, FLOOR)}
    floor = f"{max(x[FLOOR]):.2f}×"
    best = [min(x[v][i] for v in MEMORY_VARIANTS) for i in range(len(lens))]     # per length, the leanest variant
    if arg == "measured":
        return (", ".join(f"{_short(v)} {' / '.join(f'{r:.2f}' for r in x[v])}×" for v in MEMORY_VARIANTS)
                + f"; an attention that keeps nothing: {floor}")
    if arg == "met":
        ok = {_short(v): max(x[v]) <= MEMORY_GOAL for v in MEMORY_VARIANTS}
        why = " — unreachable by any attention kernel in this body" if max(x[FLOOR]) > MEMORY_GOAL else ""
        return _marks(ok) + (f"{why} (floor {floor})" if not any(ok.values()) else "")
    if arg == "gap":
        every = [r for v in MEMORY_VARIANTS for r in x[v]]
        met = sum(b <= MEMORY_GOAL for b in best)
        if met:
            return f"met at {met} of {len(lens)} lengths (the leanest variant {min(best):.2f}×)"
        return (f"missed at all {len(lens)} lengths, by {min(every) - MEMORY_GOAL:.2f}–"
                f"{max(every) - MEMORY_GOAL:.2f} ({min(every):.2f}–{max(every):.2f}× measured)")
    if arg == "floor":
        return floor
    if arg == "per_token":     # the longest length's peaks per token and layer, in fp32 numbers
        n, layers = lens[-1], d["layers"]
        dense, low = (peak[(v, n)] * 2 ** 20 / (layers * n) for v in ("dense-sdpa", FLOOR))
        return (f"{peak[('dense-sdpa', n)]:.0f} MiB / ({layers} layers × {n} tokens) ≈ {dense / 1e3:.1f} KB ≈ "
                f"{dense / 4:,.0f} fp32 numbers, the floor at ≈ {low / 4:,.0f}; the ≈ {(dense - low) / 4:,.0f} numbers")
    raise DataError(f"sparse_memory_goal: unknown part {arg!r} (measured, met, gap, floor or per_token)")


def sparse_kernel_goal(root: Path, arg: str) -> str:
    """`measured`: the forward-time ratio at 4096 tokens of the window, the distilled gate and Quest
    (top-2), with their densities; `met`: which meet ≤ 0.4×; `summary`: the window's ratio and the
    per-row selectors' range."""
    rows = _json(root, "benchmarks/results/sparse_kernel.json")["rows"]
    win, gate, quest = "window 256 + 4 sinks", "learned top-2 (distilled gate)", "quest top-2"

    def x(v):
        return _kernel_ratio(rows, v, "inference")

    def dens(v):
        return statistics.mean(r["density"] for r in rows if r["variant"] == v and r["mode"] == "inference")

    if arg == "measured":
        return (f"{win} **{x(win):.2f}×** (density {dens(win):.2f}); {gate} {x(gate):.2f}×, {quest} {x(quest):.2f}× "
                f"(density {dens(quest):.2f})")
    if arg == "met":
        return _marks({"window": x(win) <= TIME_GOAL, "quest": x(quest) <= TIME_GOAL, "learned": x(gate) <= TIME_GOAL})
    if arg == "summary":
        per_row = [x(v) for v in dict.fromkeys(r["variant"] for r in rows) if v.split()[0] in ("quest", "learned")]
        return (f"{'met' if x(win) <= TIME_GOAL else 'missed'} by the window ({x(win):.2f}×), "
                f"{'met' if max(per_row) <= TIME_GOAL else 'missed'} by the per-row selectors "
                f"({min(per_row):.2f}–{max(per_row):.2f}×)")
    raise DataError(f"sparse_kernel_goal: unknown part {arg!r} (measured, met or summary)")


def sparse_compare_at(root: Path, arg: str) -> str:
    """`LENGTH|A|B|DENSITY`: `sparse_compare`'s comparison, led by the length and density it is at."""
    length, _, _, dens = arg.split("|")
    return f"{length} tokens, density {float(dens):.2f}: {sparse_compare(root, arg)}"


def sparse_next_budget(root: Path, arg: str) -> str:
    """`LENGTH`: the sparsest budgets just above density 0.25, and the sparsity they reach (a budget at
    0.26 is 74% sparse, not ≥ 75%)."""
    pts = [p for p in _quality(root, arg)["points"].values() if p.get("summary") and p["selector"] != "dense"
           and p["summary"]["density"] > 0.25]
    if not pts:
        raise DataError(f"sparse_quality_{arg}.json has no budget above density 0.25")
    d = min(p["summary"]["density"] for p in pts)
    budgets = sorted({_budget(p["budget"]) for p in pts if p["summary"]["density"] == d})
    return (f"the next budgets, {' / '.join(budgets)} at density {d:.2f}, are {100 * (1 - d):.0f}% sparsity, "
            f"not 75%")


def sparse_targets(root: Path, arg: str) -> str:
    """`LENGTH`: the seed proposal's targets per headline selector: accuracy ÷ dense (≥ 0.95, over the
    held-out sequences), attention MSE (≤ 1e-4, mean over the metric sequences), the gradient cosine
    (≥ 0.95: mean, min and the sequences meeting it) and KL(dense‖sparse) per token (≤ 0.001)."""
    data = _quality(root, arg)
    lines = ["| selector (density) | accuracy ÷ dense (≥ 0.95) | attention MSE (≤ 1e-4), mean | gradient cosine "
             "(≥ 0.95): mean, min, sequences meeting it | KL(dense‖sparse) per token (≤ 0.001) |",
             "|---|---:|---:|---:|---:|"]
    for key, per in data["metrics"].items():
        if not isinstance(per, dict) or ":" not in key:
            continue
        p = data["points"][key]
        s = p["summary"]
        mse = statistics.mean(r["attention_mse"] for r in per.values())
        cos = [r["grad_cosine"] for r in per.values()]
        meet = sum(c >= 0.95 for c in cos)
        lines.append(f"| {p['selector']} {_budget(p['budget'])} ({s['density']:.2f}) | {s['accuracy_vs_dense']:.3f} "
                     f"{_mark(s['accuracy_vs_dense'] >= 0.95)} | {format(mse, '.1e').replace('e-0', 'e-')} {_mark(mse <= 1e-4)} | "
                     f"{statistics.mean(cos):.4f}, {min(cos):.4f}, {meet}/{len(cos)} {_mark(meet == len(cos))} | "
                     f"{s['kl']:.3f} {_mark(s['kl'] <= 0.001)} |")
    return "\n".join(lines)


def sparse_flex(root: Path, arg: str) -> str:
    """`FILE`: the FlexAttention rows of a benchmarks/sparse_speed.py `--parts flex` run: each kernel's
    forward time over dense SDPA's in the same run (CPU time, wall in brackets), and the compiled
    kernel's first call."""
    rows = [r for r in _json(root, arg)["rows"] if r["part"] == "flex"]
    lines = ["| tokens | kernel (quest, block-shared selection) | forward × SDPA, CPU (wall) | first call s |",
             "|---:|---|---:|---:|"]
    for r in rows:
        if r["variant"] == "dense-sdpa":
            continue
        d = next(x for x in rows if x["tokens"] == r["tokens"] and x["variant"] == "dense-sdpa")
        first = f"{r['first_call_s']:.0f}" if "first_call_s" in r else "–"
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['cpu_s'] / d['cpu_s']:.2f} ({r['wall_s'] / d['wall_s']:.2f}) "
                     f"| {first} |")
    return "\n".join(lines)


def _cell_text(text: str) -> str:
    """A generated text as one table cell: pipes escaped, line breaks shown as ⏎."""
    return " ".join(text.replace("|", "\\|").replace("\n", " ⏎ ").split())


def sparse_samples(root: Path, arg: str) -> str:
    """`FILE`: the generation samples of benchmarks/sparse_samples.py: per prompt, each selector's greedy
    continuation and how many of its tokens equal dense's (before the first difference / in all)."""
    data = _json(root, arg)
    sel = data["selection"]
    lines = [f"Greedy continuations of {data['new']} tokens after the first {data['prompt']} tokens of held-out "
             f"sequences, every layer sparse, block {sel['block_size']}, top-k {sel['top_k']}, selection per "
             f"{sel['granularity']} (`{data['command']}`).", ""]
    for s in data["samples"]:
        lines += [f"Sequence {s['sequence']}, the prompt ends: “…{_cell_text(s['prompt_tail'])}”", "",
                  "| selector | continuation | tokens as dense (before the first difference / in all) |",
                  "|---|---|---:|"]
        for name in ("dense", "quest", "learned"):
            r = s[name]
            same = "–" if name == "dense" else f"{r['same_prefix']} / {r['same_as_dense']} of {len(r['tokens'])}"
            lines.append(f"| {name} | {_cell_text(r['text'])} | {same} |")
        lines.append("")
    return "\n".join(lines).rstrip()
