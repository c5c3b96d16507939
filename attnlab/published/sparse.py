"""Renderers over benchmarks/results/sparse_quality_<length>.json, summarised by the benchmark's own
code (benchmarks/sparse_quality.py), so the docs quote exactly what its `--report` prints."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from ..errors import DataError
from ..modules.sparse import quality
from .tables import _json, _mark, md_tables


@functools.lru_cache(maxsize=None)
def _benchmark(root: Path, name: str):
    """benchmarks/<name>.py as a module (its report code renders the published tables)."""
    spec = importlib.util.spec_from_file_location(f"{name}_report", root / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sparse_module(root: Path):
    return _benchmark(root, "sparse_quality")


def sparse_speed(root: Path, arg: str) -> str:
    """`FILE` or `FILE|PART,PART`: the tables benchmarks/sparse_speed.py --report prints for that run's
    JSON (of those parts only: attention, body, flex, decode)."""
    path, _, parts = arg.partition("|")
    return _benchmark(root, "sparse_speed").tables(_json(root, path)["rows"], parts.split(",") if parts else None)


def _name(length: str) -> str:
    """A run's file under benchmarks/results: `2048_b32` names sparse_quality_2048_b32.json; a name with a
    folder (`sparse_recovery/sparse_quality_2048_b32_recovered`) names that file."""
    return f"{length}.json" if "/" in length else f"sparse_quality_{length}.json"


@functools.lru_cache(maxsize=None)
def _quality(root: Path, length: str) -> dict:
    """The JSON with its summaries recomputed from the per-sequence records by the benchmark's own
    `summarise` (deterministic bootstrap), so nothing stored by an older version is quoted. Cached:
    callers only read it."""
    data = _json(root, f"benchmarks/results/{_name(length)}")
    _sparse_module(root).summarise(data)
    return data


def _ranges(xs: list[int]) -> str:
    """[117, 118, 119, 121] -> '117–119, 121'."""
    out, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(x) if x == start else f"{start}–{x}")
            start = None
    return ", ".join(out)


def measured_on(data: dict, root: Path) -> str:
    """Which text and which of its sequences a sparse-quality result was read on."""
    m = data["meta"]
    seqs = [int(i) for i in _sparse_module(root).complete(data)]
    name = "WikiText-2 validation" if "wikitext-2" in m["text"] and m["text"].endswith("valid.txt") else m["text"]
    return (f"{name} text ({Path(m['text']).name}), {len(seqs)} held-out sequences of {m['length']} tokens "
            f"(sequences {_ranges(seqs)} of its {m['sequences']}; other text gives other numbers)")


def _ci(s: dict) -> str:
    lo, hi = s.get("ppl_change_lo"), s.get("ppl_change_hi")
    return f"{100 * s['ppl_change']:+.1f}%" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else "")


def _budget(b: dict) -> str:
    """{'window': 256, 'sinks': 4} -> '256 + 4 sinks'; {'top_k': 2} -> 'top-2'; {'mass': 0.5} -> 'mass 0.5'."""
    names = {"top_k": "top-{}", "window": "{}", "sinks": "+ {} sinks"}
    return " ".join(names.get(k, k + " {}").format(v) for k, v in b.items())


def sparse_goal(root: Path, arg: str) -> str:
    """`LENGTH`: each selector's densest budget at density ≤ 0.25 (≥ 75% block sparsity) and its
    perplexity change against dense, from sparse_quality_LENGTH.json."""
    data = _quality(root, arg)
    best = {}
    for p in data["points"].values():
        s = p.get("summary")
        if s and p["selector"] != "dense" and s["density"] <= 0.25 and (
                p["selector"] not in best or s["density"] > best[p["selector"]][1]["density"]):
            best[p["selector"]] = (p["budget"], s)
    parts = [f"{sel} {_budget(b)} ({s['density']:.2f}) {_ci(s)}"
             for sel, (b, s) in sorted(best.items(), key=lambda kv: kv[1][1]["ppl_change"])]
    return "; ".join(parts)


def sparse_table(root: Path, arg: str) -> str:
    """`LENGTH|FIRST_COLUMN`: the table of benchmarks/sparse_quality.py's report (from its JSON) whose
    header starts with FIRST_COLUMN (`selector`: every budget; `A`: equal-density comparisons)."""
    length, first = arg.split("|")
    text = _sparse_module(root).report(_quality(root, length))
    for header, rows in md_tables(text):
        if header[0] == first:
            lines = text.splitlines()
            start = lines.index("| " + " | ".join(header) + " |")
            return "\n".join(lines[start:start + len(rows) + 2])
    raise DataError(f"{_name(length)}'s report has no table starting with {first!r}")


def sparse_compare(root: Path, arg: str) -> str:
    """`LENGTH|A|B|DENSITY[|PART]`: A against B at equal density, with both intervals and the sign
    count (a pair the report does not list, e.g. B = dense, is computed the same way); PART picks one piece for a sentence: `brief` (the change and its bootstrap interval), `t`
    (the t-interval) or `better` (on how many sequences A was better, "6 of 16")."""
    length, a, b, dens, *part = arg.split("|")
    data = _quality(root, length)
    c = next((c for c in data.get("comparisons", [])
              if (c["a"], c["b"]) == (a, b) and abs(c["density"] - float(dens)) < 1e-9), None)
    if c is None:      # a pair the report does not list (B = dense: A at that density against the model)
        rows = quality.compare(data, quality.complete(data), [(a, b)], [float(dens)])
        c = rows[0] if rows else None
    if c is None:
        raise DataError(f"{_name(length)} compares no {a!r} against {b!r} at density {dens}")
    if part:
        pieces = {"brief": f"{100 * c['change']:+.1f}% [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]",
                  "t": f"[{100 * c['t_lo']:+.1f}, {100 * c['t_hi']:+.1f}]",
                  "better": f"{c['a_better_on']} of {c['sequences']}"}
        if part[0] not in pieces:
            raise DataError(f"sparse_compare: unknown part {part[0]!r} ({', '.join(pieces)})")
        return pieces[part[0]]
    noise = c["lo"] <= 0 <= c["hi"] or c["t_lo"] <= 0 <= c["t_hi"]
    return (f"{100 * c['change']:+.1f}% [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] (t-interval "
            f"[{100 * c['t_lo']:+.1f}, {100 * c['t_hi']:+.1f}]; better on {c['a_better_on']}/{c['sequences']}"
            f"{'; within noise' if noise else ''})")


def sparse_point(root: Path, arg: str) -> str:
    """`LENGTH|KEY[|FIELD]`: one point of sparse_quality_LENGTH.json (KEY as the JSON names it, e.g.
    `quest:top_k=8`): its perplexity change against dense with the 95% interval (FIELD `change`, the
    default), the change alone (`point`), its density (`density`), its KL(dense‖sparse) per token (`kl`)
    or its forward's seconds over the dense forward's, summed over the sequences both read in that run
    (`seconds`: the sweep times each forward; a slowdown on the run's machine, not a speed benchmark)."""
    length, key, *field = arg.split("|")
    data = _quality(root, length)
    p = data["points"].get(key)
    if not p or not p.get("summary"):
        raise DataError(f"{_name(length)} has no summarised point {key!r}")
    s, field = p["summary"], (field or ["change"])[0]
    out = {"change": lambda: _ci(s), "point": lambda: f"{100 * s['ppl_change']:+.1f}%",
           "density": lambda: f"{s['density']:.2f}", "kl": lambda: f"{s['kl']:.2g}",
           "seconds": lambda: f"{_seconds(p, data['points']['dense']):.1f}×"}
    if field not in out:
        raise DataError(f"sparse_point: unknown field {field!r} ({', '.join(out)})")
    return out[field]()


def _seconds(point: dict, dense: dict) -> float:
    """point's summed per-sequence seconds over dense's, on the sequences both read."""
    both = [i for i in point["sequences"] if i in dense["sequences"]]
    return sum(point["sequences"][i]["seconds"] for i in both) / sum(dense["sequences"][i]["seconds"] for i in both)


def sparse_gate_kl(root: Path, arg: str) -> str:
    """`LENGTH|SET[|after]`: the distilled gate's KL(target ‖ gate), mean over layers, on its training
    rows (`train`) or its held-out training sequence (`heldout`): "before to after", or only after."""
    length, which, *after = arg.split("|")
    layers = _quality(root, length)["gate"]["layers"].values()
    before, end = (sum(r[w][which] for r in layers) / len(layers) for w in ("before", "after"))
    return f"{end:.2f}" if after else f"{before:.1f} to {end:.2f}"


def sparse_text(root: Path, arg: str) -> str:
    """`LENGTH`: which text and sequences the sparse quality numbers were measured on."""
    return measured_on(_quality(root, arg), root)


def sparse_quality_rows(root: Path) -> list[str]:
    out = []
    for length in ("2048", "4096"):
        data = _quality(root, length)
        n = data["points"]["dense"]["summary"]["sequences"]
        cmds = data["meta"].get("commands") or [data["meta"]["command"]]
        ok = any(p["summary"]["density"] <= 0.25 and p["summary"]["ppl_change"] <= 0.02
                 for p in data["points"].values() if p.get("summary") and p["selector"] != "dense")
        out.append(f"| Sparse at ≥ 75% block sparsity (density ≤ 0.25), perplexity vs dense, {length} tokens, measured on "
                   f"{measured_on(data, root)} (95% bootstrap over sequences) | "
                   + "; ".join(f"`{c}`" for c in cmds) + f" | {sparse_goal(root, length)} | ≤ +2% {_mark(ok)} |")
    cmp = " ".join(f"{length}: learned vs quest at density {dens}: {sparse_compare(root, f'{length}|learned|quest|{dens}')}."
                   for length, dens in (("2048", "0.25"), ("2048", "0.4"), ("4096", "0.15")))
    out.append(f"| Learned gate vs Quest at equal density (same runs, interpolated per sequence) | "
               f"`python benchmarks/sparse_quality.py --length 2048 --report` (and `--length 4096`) | {cmp} | beats Quest "
               f"{_mark(False)} |")
    for length in ("2048_b32", "2048_b32_block", "4096_b32"):     # committed only once complete (in progress: runs/)
        if (root / f"benchmarks/results/sparse_quality_{length}.json").is_file():
            out += v3_rows(root, length) + lowrank_rows(root, length)
        if (root / f"benchmarks/results/{RECOVERED.format(length)}.json").is_file():
            out.append(recovered_row(root, length))
    return out


def _pair(root: Path, length: str, a: str, b: str, dens: float) -> dict:
    data = _quality(root, length)
    return quality.compare(data, quality.complete(data), [(a, b)], [dens])[0]


def sparse_road(root: Path, arg: str) -> str:
    """`LENGTH|DENSITY[|SELECTOR]`: the share of the road from Quest to the oracle that the gate (or
    SELECTOR, e.g. lowrank) covers at DENSITY (issue 27's "half the road"), from the three point
    estimates against dense in log-perplexity,

        share = (log PPL_quest - log PPL_gate) / (log PPL_quest - log PPL_oracle),

    0% at Quest, 100% at the oracle (negative: behind Quest). A point estimate: no interval."""
    length, dens, *sel = arg.split("|")
    return f"{100 * _road(root, length, float(dens), sel[0] if sel else 'learned'):.0f}%"


def _road(root: Path, length: str, dens: float, selector: str) -> float:
    import math

    q, o, g = (math.log1p(_pair(root, length, s, "dense", dens)["change"]) for s in ("quest", "oracle", selector))
    if q - o <= 0:
        raise DataError(f"{_name(length)}: the oracle is not ahead of Quest at density {dens}: no road to measure")
    return (q - g) / (q - o)


def v3_rows(root: Path, length: str) -> list[str]:
    """The gate v3 recipe's held-out rows (issue 27's goals at density 0.25): against dense (≤ +10%, a
    goal at 2048 tokens only) and against Quest at the same block size (better outside noise: both
    intervals below zero, a goal at every length)."""
    data = _quality(root, length)
    m, g = data["meta"], data["meta"]["gate"]
    per_block = m.get("granularity") == "block"      # one choice per query block: what the fast prefill kernel runs
    recipe = (f"block {m['block_size']}, {len(m['train_sequences'])} teacher sequences, target {g.get('target', 'peak')}"
              + (", reading Quest's bound" if g.get("quest") else "")
              + (", one choice per query block (the fast kernel's)" if per_block else ""))
    cmd = "; ".join(f"`{c}`" for c in (m.get("commands") or [m["command"]]) if "--selectors lowrank" not in c)
    dense, quest = _pair(root, length, "learned", "dense", 0.25), _pair(root, length, "learned", "quest", 0.25)
    beats = quest["hi"] < 0 and quest["t_hi"] < 0
    tokens = m["length"]
    return [f"| Sparse gate v3 ({recipe}), perplexity vs dense at density 0.25 (interpolated per sequence), {tokens} "
            f"tokens, {measured_on(data, root)} | {cmd} | {sparse_compare(root, f'{length}|learned|dense|0.25')} | "
            + (f"≤ +10% (point estimate) {_mark(dense['change'] <= 0.10)} |" if tokens == 2048 else "no goal at this length |"),
            f"| Sparse gate v3 vs Quest at block {m['block_size']}{' (both per query block)' if per_block else ''}, "
            f"density 0.25, {tokens} tokens (same run) | (the same) | "
            f"{sparse_compare(root, f'{length}|learned|quest|0.25')} | beats Quest outside noise {_mark(beats)} |"]


def lowrank_rows(root: Path, length: str) -> list[str]:
    """Issue 27's goals for the lowrank indexer (lowrank.py) where the run holds its points, at density
    0.25: against dense (≤ +10% by the point estimate, a goal at 2048 tokens only), against Quest
    (outside noise) and its share of the road from Quest to the oracle (half)."""
    data = _quality(root, length)
    if not any(p["selector"] == "lowrank" for p in data["points"].values()):
        return []
    m, tokens = data["meta"], data["meta"]["length"]
    per_block = m.get("granularity") == "block"
    what = (f"Sparse lowrank indexer (rank {m['lowrank']['rank']}, fitted in closed form on "
            f"{m['lowrank']['calibrate']} training sequences, block {m['block_size']}"
            + (", one choice per query block (the fast kernel's)" if per_block else "") + ")")
    cmd = "; ".join(f"`{c}`" for c in m["commands"] if "lowrank" in c)
    dense, quest = _pair(root, length, "lowrank", "dense", 0.25), _pair(root, length, "lowrank", "quest", 0.25)
    beats, road = quest["hi"] < 0 and quest["t_hi"] < 0, _road(root, length, 0.25, "lowrank")
    return [f"| {what}, perplexity vs dense at density 0.25 (interpolated per sequence), {tokens} tokens, "
            f"{measured_on(data, root)} | {cmd} | {sparse_compare(root, f'{length}|lowrank|dense|0.25')} | "
            + (f"≤ +10% (point estimate) {_mark(dense['change'] <= 0.10)} |" if tokens == 2048 else "no goal at this length |"),
            f"| {what} vs Quest{' per query block' if per_block else ''}, density 0.25, {tokens} tokens (same run) | "
            f"(the same) | {sparse_compare(root, f'{length}|lowrank|quest|0.25')} | beats Quest outside noise {_mark(beats)} |",
            f"| {what}: its share of the road from Quest to the oracle (log-perplexity, point estimate), density "
            f"0.25, {tokens} tokens (same run) | (the same) | {100 * road:.0f}% | half {_mark(road >= 0.5)} |"]


RECOVERED = "sparse_recovery/sparse_quality_{}_recovered"     # the v3 run's points after recovery training


def recovered_row(root: Path, length: str) -> str:
    """Issue 27's recovery goal: the gate after recovery training (LoRA by token KL, the selection frozen)
    at density 0.25, ≤ +5% against dense, judged by the point estimate like the +10% goal, with Quest given
    the same budget beside it."""
    name = RECOVERED.format(length)
    data = _quality(root, name)
    r, tokens = data["meta"]["recover"], data["meta"]["length"]
    cmd = "; ".join(f"`{c}`" for c in (data["meta"].get("commands") or [data["meta"]["command"]])[:1])
    dense = _pair(root, name, "learned", "dense", 0.25)
    return (f"| Sparse gate v3 after recovery training (LoRA r {r['r']}, {r['steps']} steps, token KL; Quest the same "
            f"budget), perplexity vs dense at density 0.25, {tokens} tokens, {measured_on(data, root)} | {cmd} | "
            f"gate {sparse_compare(root, f'{name}|learned|dense|0.25')}; Quest "
            f"{sparse_compare(root, f'{name}|quest|dense|0.25|brief')}; gate vs Quest "
            f"{sparse_compare(root, f'{name}|learned|quest|0.25')} | ≤ +5% (point estimate) {_mark(dense['change'] <= 0.05)} |")


GRANULARITY_SAME = ("model", "length", "block_size", "text_tokens", "sequences")   # the text: by these and its name


GRANULAR = ("quest", "oracle", "learned")     # the selectors with a granularity (the window has none)


def _granularity_data(root: Path, length: str) -> dict:
    """The row-wise run's points and the block-shared run's quest, oracle and learned points (renamed
    `quest·block`, ...) in one data dict, on the sequences both read; refused when the runs differ in
    model, length, block size, text (its name and token count: the two runs may have read it from
    different folders) or a sequence's dense NLL."""
    row = _json(root, f"benchmarks/results/sparse_quality_{length}.json")
    block = _json(root, f"benchmarks/results/sparse_quality_{length}_block.json")
    bad = [k for k in GRANULARITY_SAME if row["meta"].get(k) != block["meta"].get(k)]
    bad += ["text"] if Path(row["meta"]["text"]).name != Path(block["meta"]["text"]).name else []
    if bad:
        raise DataError(f"sparse_quality_{length}_block.json differs from sparse_quality_{length}.json in "
                        f"{', '.join(bad)}: rerun it with the row-wise run's settings")
    if (si := quality.dense_mismatch(row, block)) is not None:
        raise DataError(f"sequence {si}: the block-shared run's dense NLL differs from the row-wise run's")
    in_block = {p["selector"] for p in block["points"].values()}     # a row-run selector the block run lacks would
    keep = ("dense", "window") + tuple(s for s in GRANULAR if s in in_block)   # only narrow the sequences compared
    points = {k: p for k, p in row["points"].items() if p["selector"] in keep}
    for k, p in block["points"].items():
        if p["selector"] in GRANULAR:
            name = p["selector"] + "·block"
            points[f"{name}:{k.split(':', 1)[1]}"] = {**p, "selector": name}
    return {"meta": row["meta"], "points": points}


def sparse_granularity(root: Path, arg: str) -> str:
    """`LENGTH[|DENSITY,...]`: the block-shared selection (granularity: block) against the row-wise one,
    the window, dense, and (where the block run has a gate) the gate per block against Quest and the
    oracle per block, at equal density (0.25, 0.3 and 0.4 unless named), on the held-out sequences both
    sparse_quality_LENGTH runs read (quality.compare: per sequence, NLL per token interpolated in
    density; paired over sequences). A pair with a selector neither run has is left out."""
    from ..modules.sparse import quality
    from .sparse_ablation import _pct

    length, *dens = arg.split("|")
    densities = [float(d) for d in dens[0].split(",")] if dens else [0.25, 0.3, 0.4]
    data = _granularity_data(root, length)
    seqs = quality.complete(data)
    if len(seqs) < quality.MIN_SEQUENCES:
        raise DataError(f"sparse_quality_{length}_block.json: fewer than {quality.MIN_SEQUENCES} held-out sequences "
                        f"read by every budget of both runs")
    have = {p["selector"] for p in data["points"].values()}
    lines = [f"{len(seqs)} held-out sequences of {data['meta']['length']} tokens (sequences "
             f"{_ranges([int(s) for s in seqs])}), read by both runs; A ÷ B − 1 in perplexity at equal density "
             f"(negative: A is better); intervals: 95% bootstrap over sequences, and the t-interval.", "",
             "| A | B | " + " | ".join(f"density {d:g}" for d in densities) + " |",
             "|---|---|" + "---:|" * len(densities)]
    pairs = [(f"{s}·block", s) for s in GRANULAR] + [(f"{s}·block", b) for b in ("window", "dense") for s in GRANULAR]
    pairs += [("learned·block", "quest·block"), ("learned·block", "oracle·block")]
    for a, b in pairs:
        if a not in have or b not in have:
            continue
        cells = []
        for density in densities:
            rows = quality.compare(data, seqs, [(a, b)], [density])
            cells.append(_pct(rows[0]) if rows else "– (density not reached)")
        lines.append(f"| {a} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
