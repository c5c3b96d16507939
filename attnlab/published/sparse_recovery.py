"""Recovery training's verdict (issue 27, item 3): each selector before and after its own LoRA
adapter, trained with the same budget and the selection frozen (modules/sparse/recovery.py).

A recovery run (`benchmarks/sparse_quality.py --recover-steps N`, its JSON under
benchmarks/results/sparse_recovery/) holds only recovered points; the same selectors without
recovery were read on the same sequences by other runs (the gate ablation's files, a reference run
beside the recovery's), whose dense NLL must match, with the same block size and granularity, the
same per-sequence density, and for the gate the same distillation recipe. Per recovered point,
paired over sequences (the unit resampled), each sparse run against its own run's dense NLL:

    before = ppl_sparse / ppl_dense - 1,  after = ppl_sparse+LoRA / ppl_dense - 1,
    after vs before = exp(mean_s (d_after - d_before)_s) - 1,   d = (nll_sparse - nll_dense) / tokens,
    gap closed = 1 - after / before            (the share of the perplexity gap to dense removed)

a point estimate, shown only where there is a gap to close (before above zero by both intervals;
else the ratio is undefined or meaningless). Then the recovered selectors against each other where
they keep the same share of causal pairs on every sequence (top-k selectors at the same k and
block size: equal density without interpolation; a window near that density is not paired).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..modules.sparse import quality
from .sparse_ablation import _pct
from .tables import _json

RESULTS = "benchmarks/results"
DIR = f"{RESULTS}/sparse_recovery"


def _per_seq(point: dict, seqs: list[str], field: str = "nll") -> np.ndarray:
    """NLL per token of each sequence (or, field="density", its density)."""
    seq = point["sequences"]
    return np.array([seq[s][field] / (seq[s]["tokens"] if field == "nll" else 1) for s in seqs])


def _recipe(meta: dict) -> tuple:
    """What a learned point's selection depends on besides its budget: the distilled gate's recipe."""
    return (meta.get("gate"), meta.get("train_sequences"), Path(meta.get("train_text") or "").name)


def _before(root, names: list[str], key: str, run: dict) -> tuple[dict, np.ndarray]:
    """The unrecovered point `key` from the first of the results files `names` (paths under
    benchmarks/results, without .json) that has it, checked to have read every sequence of the
    recovery run with the same dense NLL, block size, granularity and per-sequence density (and a gate
    of the same recipe), and that file's dense NLL per token on those sequences."""
    seqs = quality.complete(run)
    elsewhere = []                      # the files read at another block size: a point there is another selection
    for name in names:
        rel = f"{RESULTS}/{name}.json"
        other = _json(root, rel)
        if other.get("meta", {}).get("block_size") != run["meta"].get("block_size"):
            elsewhere.append(f"{name} at block_size {other.get('meta', {}).get('block_size')}")
        if "recover" in other.get("meta", {}):
            raise DataError(f"{rel} is a recovery run (meta.recover): its points are recovered, not the selection "
                            f"before recovery; name a run without --recover-steps")
        if key not in other["points"]:
            continue
        if (si := quality.dense_mismatch(run, other)) is not None:
            raise DataError(f"{rel}'s dense NLL of sequence {si} differs from the recovery run's")
        missing = set(seqs) - (set(other["points"][key]["sequences"]) & set(other["points"]["dense"]["sequences"]))
        if missing:
            raise DataError(f"{rel} has not read {key} on sequences {', '.join(sorted(missing, key=int))}")
        for field in ("length", "block_size", "granularity"):
            if other["meta"].get(field) != run["meta"].get(field):
                raise DataError(f"{rel} read {key} at {field} {other['meta'].get(field)}, the recovery run at "
                                f"{run['meta'].get(field)}: name an unrecovered run of the same settings")
        if key.startswith("learned") and _recipe(other["meta"]) != _recipe(run["meta"]):
            raise DataError(f"{rel}'s gate was distilled by another recipe than the recovery run's "
                            f"(meta.gate, train_sequences, train_text): its {key} is another selector")
        p = other["points"][key]
        if not np.allclose(_per_seq(p, seqs, "density"), _per_seq(run["points"][key], seqs, "density"),
                           rtol=1e-6, atol=0):
            raise DataError(f"{rel}'s {key} keeps another density than the recovery run's: not the same selection")
        return p, quality.dense_nll(other, seqs)
    where = (f" ({', '.join(elsewhere)}, the recovery run at {run['meta'].get('block_size')}: name runs of its block "
             f"size)" if elsewhere else "")
    raise DataError(f"none of {', '.join(names)} in {RESULTS} has the unrecovered point {key}{where}: read it first "
                    f"(sparse_quality.py --split validation with that selector and budget)")


def _gap_closed(before: dict, after: dict) -> str:
    """1 - after / before, where before is a gap outside noise (else '–')."""
    if before["lo"] <= 0 or before["t_lo"] <= 0:
        return "– (no gap outside noise)"
    return f"{100 * (1 - after['change'] / before['change']):.0f}%"


def sparse_recovery(root, arg: str) -> str:
    """`FILE|BEFORE,BEFORE...[|DENSITY]`: the table of a recovery run (FILE in
    benchmarks/results/sparse_recovery, without .json) against the same points unrecovered, found in
    the results files BEFORE (paths under benchmarks/results without .json, e.g.
    sparse_gate_ablation/reference_b32); with DENSITY, also each recovered selector against dense and
    against the others at that density (NLL interpolated per sequence between its recovered budgets)."""
    if arg.count("|") not in (1, 2):
        raise DataError(f"render:sparse_recovery:{arg}: expected FILE|BEFORE,BEFORE...[|DENSITY] (the recovery run "
                        f"under {DIR}, then the unrecovered runs under {RESULTS}, all without .json, then optionally "
                        f"a density)")
    name, befores, *rest = arg.split("|")
    try:
        target = float(rest[0]) if rest else None
    except ValueError:
        target = -1.0
    if target is not None and not 0 < target <= 1:
        raise DataError(f"render:sparse_recovery:{arg}: the third field is a density in (0, 1], got {rest[0]!r}")
    run = _json(root, f"{DIR}/{name}.json")
    if "recover" not in run.get("meta", {}):
        raise DataError(f"{DIR}/{name}.json is not a recovery run (no meta.recover): name the JSON of a "
                        f"sparse_quality.py --recover-steps run before the '|', and the runs without it after")
    seqs = quality.complete(run)
    if len(seqs) < quality.MIN_SEQUENCES:
        raise DataError(f"{DIR}/{name}.json: fewer than {quality.MIN_SEQUENCES} sequences read by every point")
    dense = quality.dense_nll(run, seqs)
    r = run["meta"]["recover"]
    split = "validation" if run["meta"].get("split") == "validation" else "held-out"
    lines = [f"{len(seqs)} {split} sequences of {run['meta']['length']} tokens (sequences {', '.join(seqs)}); "
             f"each point its own LoRA adapter (rank {r['r']}, {r['steps']} steps of one training sequence, Adam at "
             f"lr {r['lr']}, token KL to dense), the selection frozen; intervals: 95% bootstrap over sequences, "
             f"and the t-interval.", "",
             "| selector | budget | density | before: vs dense | after: vs dense | after vs before | gap closed | "
             "training KL first → last 10 steps |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    after_of = {}
    for key, p in run["points"].items():
        if p["selector"] == "dense":
            continue
        b, dense_b = _before(root, befores.split(","), key, run)
        da, db = _per_seq(p, seqs) - dense, _per_seq(b, seqs) - dense_b
        after, before = quality.paired_change(da), quality.paired_change(db)
        rec = run["recovery"][key]
        density = _per_seq(p, seqs, "density")
        after_of[key] = (p["selector"], density, _per_seq(p, seqs))
        lines.append(f"| {p['selector']} | {', '.join(f'{k} {v}' for k, v in p['budget'].items())} | "
                     f"{density.mean():.3f} | {_pct(before)} | {_pct(after)} | {_pct(quality.paired_change(da - db))} | "
                     f"{_gap_closed(before, after)} | {rec['kl_first']:.4f} → {rec['kl_last']:.4f} |")
    pairs = [(a, b) for a in after_of for b in after_of
             if a < b and np.allclose(after_of[a][1], after_of[b][1], rtol=1e-6, atol=0)]
    if pairs:
        lines += ["", "Recovered against recovered at the same density on every sequence (same k: the same causal "
                  "pairs kept):", ""]
        for a, b in pairs:
            (sa, d, va), (sb, _, vb) = after_of[a], after_of[b]
            lines.append(f"- {sa} against {sb}, density {d.mean():.3f}: {_pct(quality.paired_change(va - vb))}")
    # Across selectors only (one selector at two budgets says nothing about selection), and only without a
    # target density: with one, the interpolated comparison at equal density below replaces these.
    richer = [(a, b) for a in after_of for b in after_of if after_of[a][0] != after_of[b][0] and target is None
              and (a, b) not in pairs and (b, a) not in pairs and np.all(after_of[a][1] <= after_of[b][1])]
    if richer:
        lines += ["", "Recovered against a recovered selector that keeps more pairs on every sequence (no equal "
                  "density to compare at; an advantage to B):", ""]
        for a, b in richer:
            (sa, da, va), (sb, db, vb) = after_of[a], after_of[b]
            lines.append(f"- {sa} (density {da.mean():.3f}) against {sb} (density {db.mean():.3f}): "
                         f"{_pct(quality.paired_change(va - vb))}")
    if target is not None:
        sels = list(dict.fromkeys(sel for sel, _, _ in after_of.values()))
        rows = quality.compare(run, seqs, [(a, "dense") for a in sels] + [(a, b) for a in sels for b in sels if a < b],
                               [target])
        if not rows:
            raise DataError(f"{DIR}/{name}.json: no recovered selector has budgets on both sides of density {target}")
        lines += ["", f"Recovered, at density {target:.2f} (NLL per token interpolated per sequence between each "
                  "selector's recovered budgets):", ""]
        lines += [f"- {c['a']} against {c['b']}: {_pct(c)}" for c in rows]
    return "\n".join(lines)
