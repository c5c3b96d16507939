"""The learned gate's recipe ablations (issue 27), read on VALIDATION sequences of the text (never
the held-out ones the docs report): every JSON of benchmarks/results/sparse_gate_ablation/ is one
`benchmarks/sparse_quality.py --split validation` run. `reference.json` holds dense and the
selectors that need no training (quest, oracle, window); `reference_<tag>.json` more of them with
other settings (e.g. reference_b32.json: the oracle at block size 32), rows named `selector·<tag>`;
every other file one distilled gate (selectors learned and learned-mass) or one fitted lowrank indexer,
named by its file. Each gate is merged with the reference on
the sequences both read and compared at equal density by the benchmark's own summary
(quality.compare: per sequence, NLL per token interpolated in density; paired over sequences)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..modules.sparse import quality
from .tables import _json

DIR = "benchmarks/results/sparse_gate_ablation"
SAME = ("model", "length", "text", "text_tokens", "split")     # block size may differ: compared at equal density


def _same(meta: dict, k: str):
    """The setting compared between files; the text by its folder and name (the runs were made from
    worktrees at different paths, ../shared being the same data), and its token count."""
    return "/".join(Path(meta["text"]).parts[-2:]) if k == "text" else meta.get(k)


def _runs(root: Path) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """reference.json, the other references by tag, the gates by name."""
    folder = root / DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not any(f.name == "reference.json" for f in files):
        raise DataError(f"{DIR}/reference.json is missing: run the reference command of docs/sparse_attention.md")
    ref = _json(root, f"{DIR}/reference.json")
    refs = {f.stem.split("_", 1)[1]: _json(root, f"{DIR}/{f.name}") for f in files
            if f.stem.startswith("reference_")}
    return ref, refs, {f.stem: _json(root, f"{DIR}/{f.name}") for f in files if not f.stem.startswith("reference")}


def merged(ref: dict, run: dict, name: str, tag: str | None = None) -> dict:
    """The reference's points and the run's learned (or lowrank) points (renamed `name`, `name·mass`), or with a
    tag (another reference, at another block size, say) its every selector as `selector·tag`, in one
    data dict; refused when the two were read on different text, length, split or sequences' dense
    NLL (a different block size is allowed: the comparisons are at equal density)."""
    bad = [k for k in SAME if _same(ref["meta"], k) != _same(run["meta"], k)]
    if bad:
        raise DataError(f"{DIR}/{name}.json differs from reference.json in {', '.join(bad)}: rerun it with the "
                        f"reference's settings")
    if (si := quality.dense_mismatch(ref, run)) is not None:
        raise DataError(f"{DIR}/{name}.json's dense NLL of sequence {si} differs from the reference's")
    points = {k: p for k, p in ref["points"].items()}
    for k, p in run["points"].items():
        if p["selector"] == "dense":
            continue
        sel = f"{p['selector']}·{tag}" if tag else name + ("·mass" if p["selector"] == "learned-mass" else "")
        points[f"{sel}:{k.split(':', 1)[1]}"] = {**p, "selector": sel}
    return {"meta": run["meta"], "points": points}


def _pct(c: dict) -> str:
    noise = c["lo"] <= 0 <= c["hi"] or c["t_lo"] <= 0 <= c["t_hi"]
    return (f"{100 * c['change']:+.1f}% [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] "
            f"(t [{100 * c['t_lo']:+.1f}, {100 * c['t_hi']:+.1f}]; better on {c['a_better_on']}/{c['sequences']}"
            f"{'; within noise' if noise else ''})")


def _recipe(meta: dict) -> str:
    block = f", block {meta['block_size']}" if meta.get("block_size", 64) != 64 else ""
    if "lowrank" in meta:         # a fitted indexer (lowrank.py), not a distilled gate
        lr = meta["lowrank"]
        return f"lowrank indexer, rank {lr['rank']}, fitted on {lr['calibrate']} seq, {meta.get('granularity', 'row')}{block}"
    g = meta["gate"]
    extra = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("rows", "steps", "lr", "dim"))
    text = "" if meta.get("train_text", meta["text"]) == meta["text"] else f" of {Path(meta['train_text']).name}"
    return (f"{len(meta['train_sequences'])} seq{text}, {g['rows']} rows, {g['steps']} steps, lr {g['lr']}, "
            f"width {g['dim']}, {meta.get('granularity', 'row')}{block}" + (f", {extra}" if extra else ""))


def _cell(data: dict, a: str, b: str, density: float) -> str:
    seqs = quality.complete(data)
    if len(seqs) < quality.MIN_SEQUENCES:
        return "–"
    rows = quality.compare(data, seqs, [(a, b)], [density])
    return _pct(rows[0]) if rows else "– (density not reached)"


def gate_ablation(root: Path, arg: str) -> str:
    """`DENSITY|BASELINE`: per selector of the reference and per distilled gate (top-k and by mass),
    perplexity against dense at that density, and each gate against Quest and against the BASELINE
    gate (a file's name), all at equal density on the validation sequences."""
    density, baseline = arg.split("|")
    d = float(density)
    ref, refs, runs = _runs(root)
    if baseline not in runs:
        raise DataError(f"{DIR}/{baseline}.json is missing (the baseline gate of the ablation table)")
    seqs = quality.complete(ref)
    lines = [f"{len(seqs)} validation sequences of {ref['meta']['length']} tokens (sequences "
             f"{', '.join(seqs)}); at density {d:.2f}; intervals: 95% bootstrap over sequences, and the t-interval.", "",
             f"| selector | recipe | vs dense | vs quest | vs {baseline} |", "|---|---|---:|---:|---:|"]
    for sel in ("oracle", "quest", "window"):
        if any(p["selector"] == sel for p in ref["points"].values()):
            lines.append(f"| {sel} | no training | {_cell(ref, sel, 'dense', d)} | "
                         f"{'–' if sel == 'quest' else _cell(ref, sel, 'quest', d)} | – |")
    for tag, other in refs.items():
        data = merged(ref, other, f"reference_{tag}", tag)
        for sel in dict.fromkeys(p["selector"] for p in other["points"].values() if p["selector"] != "dense"):
            lines.append(f"| {sel}·{tag} | no training, block {other['meta']['block_size']} | "
                         f"{_cell(data, f'{sel}·{tag}', 'dense', d)} | {_cell(data, f'{sel}·{tag}', 'quest', d)} | – |")
    base = merged(ref, runs[baseline], baseline)
    for name, run in runs.items():
        data = merged(ref, run, name)
        for sel in (name, name + "·mass"):
            if not any(p["selector"] == sel for p in data["points"].values()):
                continue
            both = {**data, "points": {**data["points"], **{k: p for k, p in base["points"].items()
                                                          if p["selector"] == baseline}}}
            vs_base = "–" if name == baseline else _cell(both, sel, baseline, d)
            lines.append(f"| {sel} | {_recipe(run['meta'])} | {_cell(data, sel, 'dense', d)} | "
                         f"{_cell(data, sel, 'quest', d)} | {vs_base} |")
    return "\n".join(lines)


def gate_pair(root: Path, arg: str) -> str:
    """`DENSITY|A|B`: one line, A against B at that density on the validation sequences both read, A
    and B being rows of the gate_ablation table (a reference selector, `selector·tag` of another
    reference, a gate's file name or `name·mass`) or dense."""
    density, a, b = arg.split("|")
    ref, refs, runs = _runs(root)
    points = dict(ref["points"])
    for tag, other in refs.items():
        points.update(merged(ref, other, f"reference_{tag}", tag)["points"])
    for name, run in runs.items():
        points.update(merged(ref, run, name)["points"])
    missing = [x for x in (a, b) if not any(p["selector"] == x for p in points.values())]
    if missing:
        raise DataError(f"{DIR}: no row named {', '.join(missing)} (the gate_ablation table's row names)")
    keep = {k: p for k, p in points.items() if p["selector"] in (a, b, "dense")}
    return _cell({"meta": ref["meta"], "points": keep}, a, b, float(density))
