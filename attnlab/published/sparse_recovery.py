"""Recovery training's verdict (issue 27, item 3): each selector before and after its own LoRA
adapter, trained with the same budget and the selection frozen (modules/sparse/recovery.py).

A recovery run (`benchmarks/sparse_quality.py --recover-steps N`, its JSON under
benchmarks/results/sparse_recovery/) holds only recovered points; the same selectors without
recovery were read on the same sequences by other runs (the gate ablation's files, a reference run
beside the recovery's), whose dense NLL must match. Per recovered point, paired over sequences (the unit resampled):

    before = ppl_sparse / ppl_dense - 1,  after = ppl_sparse+LoRA / ppl_dense - 1,
    after vs before = exp(mean_s (nll_after - nll_before)_s / tokens) - 1,
    gap closed = 1 - after / before            (the share of the perplexity gap to dense removed)

and the recovered selectors against each other at their common density (top-k selectors at the same
k keep the same causal pairs on every sequence: equal density without interpolation).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..modules.sparse import quality
from .sparse_ablation import _pct
from .tables import _json

RESULTS = "benchmarks/results"
DIR = f"{RESULTS}/sparse_recovery"


def _per_seq(point: dict, seqs: list[str]) -> np.ndarray:
    """NLL per token of each sequence."""
    return np.array([point["sequences"][s]["nll"] / point["sequences"][s]["tokens"] for s in seqs])


def _before(root, names: list[str], key: str, run: dict) -> dict:
    """The unrecovered point `key` from the first of the results files `names` (paths under
    benchmarks/results, without .json) that has it, checked to have read every sequence of the
    recovery run with the same dense NLL."""
    for name in names:
        other = _json(root, f"{RESULTS}/{name}.json")
        if key in other["points"]:
            if (si := quality.dense_mismatch(run, other)) is not None:
                raise DataError(f"{RESULTS}/{name}.json's dense NLL of sequence {si} differs from the recovery run's")
            missing = set(quality.complete(run)) - set(other["points"][key]["sequences"])
            if missing:
                raise DataError(f"{RESULTS}/{name}.json has not read {key} on sequences {', '.join(sorted(missing))}")
            return other["points"][key]
    raise DataError(f"none of {', '.join(names)} in {RESULTS} has the unrecovered point {key}: read it first "
                    f"(sparse_quality.py --split validation with that selector and budget)")


def sparse_recovery(root, arg: str) -> str:
    """`FILE|BEFORE,BEFORE...`: the table of a recovery run (FILE in benchmarks/results/sparse_recovery,
    without .json) against the same points unrecovered, found in the results files BEFORE (paths
    under benchmarks/results without .json, e.g. sparse_gate_ablation/reference_b32)."""
    name, befores = arg.split("|")
    run = _json(root, f"{DIR}/{name}.json")
    seqs = quality.complete(run)
    if len(seqs) < quality.MIN_SEQUENCES:
        raise DataError(f"{DIR}/{name}.json: fewer than {quality.MIN_SEQUENCES} sequences read by every point")
    dense = quality.dense_nll(run, seqs)
    r = run["meta"]["recover"]
    lines = [f"{len(seqs)} validation sequences of {run['meta']['length']} tokens (sequences {', '.join(seqs)}); "
             f"each point its own LoRA adapter (rank {r['r']}, {r['steps']} steps of one training sequence, Adam at "
             f"lr {r['lr']}, token KL to dense), the selection frozen; intervals: 95% bootstrap over sequences, "
             f"and the t-interval.", "",
             "| selector | budget | density | before: vs dense | after: vs dense | after vs before | gap closed | "
             "training KL first → last 10 steps |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    after_of = {}
    for key, p in run["points"].items():
        if p["selector"] == "dense":
            continue
        b = _before(root, befores.split(","), key, run)
        va, vb = _per_seq(p, seqs), _per_seq(b, seqs)
        after, before = quality.paired_change(va - dense), quality.paired_change(vb - dense)
        rec = run["recovery"][key]
        density = float(np.mean([p["sequences"][s]["density"] for s in seqs]))
        after_of[key] = (p["selector"], density, va)
        lines.append(f"| {p['selector']} | {', '.join(f'{k} {v}' for k, v in p['budget'].items())} | {density:.3f} | "
                     f"{_pct(before)} | {_pct(after)} | {_pct(quality.paired_change(va - vb))} | "
                     f"{100 * (1 - after['change'] / before['change']):.0f}% | "
                     f"{rec['kl_first']:.4f} → {rec['kl_last']:.4f} |")
    pairs = [(a, b) for a in after_of for b in after_of if a < b and abs(after_of[a][1] - after_of[b][1]) < 1e-6]
    if pairs:
        lines += ["", "Recovered against recovered at the same density (same k: the same causal pairs kept):", ""]
        for a, b in pairs:
            (sa, d, va), (sb, _, vb) = after_of[a], after_of[b]
            lines.append(f"- {sa} against {sb}, density {d:.3f}: {_pct(quality.paired_change(va - vb))}")
    return "\n".join(lines)
