"""Density against quality of the sparse attentions on held-out WikiText-2, every layer sparse.

    python benchmarks/sparse_quality.py --length 2048 --train 12 --heldout 16 --gate-steps 2000 --metric-sequences 8
    python benchmarks/sparse_quality.py --length 4096 --train 6 --heldout 7 --gate-steps 2000
    python benchmarks/sparse_quality.py --length 2048 --report      # tables; the curves next to the JSON (.png)
    python benchmarks/sparse_quality.py --length 2048 --report --publish   # ... and into docs/img/ (the docs' figure)

(the runs in docs/sparse_attention.md, on one CPU thread: ~5 min per held-out sequence at 2048 tokens
and ~20 at 4096, ~5 min per metric sequence; the teacher pass and gate training ~4-5 min per length)

The text (../shared/data/wikitext-2/valid.txt) is tokenized once and cut into non-overlapping
sequences of --length tokens: the learned gates are distilled from the FIRST --train sequences, the
metrics read on the LAST --heldout ones (never used for distillation). Intervals: 95% bootstrap over
held-out sequences, paired with dense; comparisons between selectors at equal density also give a
t-interval, and a difference is called outside noise only when both exclude zero. For each selector and budget
(window 64..512 + 4 sinks; quest, learned top-k and oracle top-k with k = 1..8 extra blocks; learned
by cumulative mass 0.5..0.95) and each held-out sequence: perplexity, next-token accuracy,
KL(dense || sparse) per token, top-1 agreement with dense, and the achieved density (1 - sparsity:
causal pairs kept) and work (pairs the gather kernel scores / causal pairs). On the first
--metric-sequences held-out sequences, for each selector's --headline budget: attention MSE over the
causal entries and the cosine between the attention weights' gradients with dense and sparse
attention. The gate's distillation cost is recorded: teacher pass and gate training, seconds per
token. Resumable: every finished (budget, sequence) is written to the JSON at once and skipped on a
rerun (sequences are keyed by their index in the text, so a larger --heldout adds earlier ones);
the trained gate is saved in runs/<the JSON's name>/ (safetensors) and loaded on a rerun, and a
rerun with other model, length, training or gate settings is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402
from attnlab.data.tokenize import Example  # noqa: E402
from attnlab.distill import attention_gradients, attention_mse  # noqa: E402
from attnlab.stats import bootstrap_ci, paired_bootstrap_ppl, t_interval  # noqa: E402

BLOCK = 64
BUDGETS = {
    "window": [{"window": w, "sinks": 4} for w in (64, 128, 256, 512)],
    "quest": [{"top_k": k} for k in (1, 2, 4, 8)],
    "learned": [{"top_k": k} for k in (1, 2, 4, 8)],
    "learned-mass": [{"mass": m} for m in (0.5, 0.7, 0.9, 0.95)],
    "oracle": [{"top_k": k} for k in (1, 2, 4, 8)],
}
COMPARE = [("learned", "quest"), ("learned", "window"), ("learned-mass", "quest"), ("quest", "window"),
           ("oracle", "learned")]
DENSITIES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
MIN_SEQUENCES = 2          # below this, no interval and no comparison
HEADLINE = {"window": {"window": 256, "sinks": 4}, "quest": {"top_k": 2}, "learned": {"top_k": 2},
            "learned-mass": {"mass": 0.9}, "oracle": {"top_k": 2}}


def options(selector: str, budget: dict, kernel: str) -> dict:
    variant = {"learned-mass": "learned", "oracle": "learned"}.get(selector, selector)
    out = {"variant": variant, "block_size": BLOCK, "kernel": kernel, **budget}
    if selector == "oracle":
        out["oracle"] = True
    return out


def attach(model, selector: str, budget: dict, args, gate_state):
    """The selector at this budget on every layer; the learned ones with the distilled gate."""
    opts = options(selector, budget, args.kernel)
    if opts["variant"] in ("quest", "learned"):
        opts["granularity"] = args.granularity
    if selector.startswith("learned"):
        opts["gate_dim"] = args.gate_dim
    plugin = attnlab.attach(model, "sparse", **opts)
    if selector.startswith("learned"):
        plugin.load_state_dict(gate_state)
    return plugin


def key(selector: str, budget: dict) -> str:
    return selector + ":" + ",".join(f"{k}={v}" for k, v in budget.items())


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@torch.no_grad()
def token_stats(logits, ids, dense_logp) -> dict:
    """Sums over the sequence's predicted tokens (positions 0..T-2 predict 1..T-1)."""
    logp = F.log_softmax(logits[0, :-1].float(), -1)
    target = ids[1:]
    out = {"tokens": int(target.numel()), "nll": float(-logp.gather(-1, target[:, None]).sum()),
           "correct": int((logp.argmax(-1) == target).sum())}
    if dense_logp is not None:
        out["kl"] = float(F.kl_div(logp, dense_logp, log_target=True, reduction="sum"))
        out["agree"] = int((logp.argmax(-1) == dense_logp.argmax(-1)).sum())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--train", type=int, default=8, help="sequences the gates are distilled from (the first)")
    ap.add_argument("--heldout", type=int, default=4, help="sequences the metrics read (the last)")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"))
    ap.add_argument("--selectors", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--kernel", default="masked", help="the kernels compute the same function (tested); "
                    "masked is the fastest on CPU for per-row selections; work is counted with gather")
    ap.add_argument("--granularity", default="row", choices=["row", "block"],
                    help="quest/learned selection per row (the committed v2 results) or per query block "
                         "(results go to ..._block.json unless --out)")
    ap.add_argument("--gate-rows", type=int, default=512, help="cached rows per sequence and layer")
    ap.add_argument("--gate-steps", type=int, default=2000)
    ap.add_argument("--gate-lr", type=float, default=3e-3)
    ap.add_argument("--gate-dim", type=int, default=64)
    ap.add_argument("--metric-sequences", type=int, default=0,
                    help="held-out sequences for attention MSE and gradient cosine (headline budgets; 0: skip)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_quality_<length>.json)")
    ap.add_argument("--report", action="store_true",
                    help="only print the tables and draw the curves from the JSON (the PNG goes next to --out)")
    ap.add_argument("--publish", action="store_true",
                    help="with --report: also write the curves to docs/img/sparse_quality_<length>.png, the figure "
                         "the docs show (never done otherwise: a run on other text must not replace it)")
    ap.add_argument("--metrics-only", action="store_true",
                    help="skip the curves: only attention MSE and gradient cosine (e.g. in a second process "
                         "with its own --out, once the main run has saved the gate)")
    args = ap.parse_args(argv)
    suffix = "_block" if args.granularity == "block" else ""
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"sparse_quality_{args.length}{suffix}.json")
    if args.report:
        data = load(out)
        if not data.get("points"):
            raise SystemExit(f"{out} holds no results yet: run without --report first (the commands in the docstring)")
        summarise(data)
        print(report(data))
        if data["points"].get("dense", {}).get("summary"):
            plot(data, out.with_suffix(".png"))
            print(f"curves: {out.with_suffix('.png')}")
            if args.publish:
                plot(data, ROOT / "docs" / "img" / f"sparse_quality_{args.length}.png")
                print(f"published: docs/img/sparse_quality_{args.length}.png")
        return
    if args.publish:
        raise SystemExit("--publish goes with --report (it publishes the curves of a finished JSON)")
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dir = ROOT / "runs" / out.stem          # the gate belongs to its JSON: another --out, another gate
    state_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    bb = attnlab.load_backbone("smollm2-135m")
    model, tok = bb.model, bb.tokenizer
    ids = torch.tensor(tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"])
    n = len(ids) // args.length
    if args.train + args.heldout > n:
        raise SystemExit(f"{len(ids)} tokens make {n} sequences of {args.length}; --train + --heldout must fit")
    seqs = ids[:n * args.length].view(n, args.length)
    train, heldout = seqs[:args.train], seqs[n - args.heldout:]
    data = load(out)
    meta = {"model": "smollm2-135m", "length": args.length, "block_size": BLOCK, "text": args.text,
            "text_tokens": len(ids), "sequences": n, "train_sequences": list(range(args.train)),
            "heldout_sequences": list(range(n - args.heldout, n)), "kernel": args.kernel,
            "gate": {"rows": args.gate_rows, "steps": args.gate_steps, "lr": args.gate_lr, "dim": args.gate_dim},
            "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    old = data.setdefault("meta", meta)
    commands = old.setdefault("commands", [old["command"]])   # every run that added to this JSON
    if meta["command"] not in commands:
        commands.append(meta["command"])
    same = ("model", "length", "block_size", "text", "train_sequences", "gate")
    if any(old.get(k) != meta[k] for k in same):
        raise SystemExit(f"{out} holds a run with other settings ({', '.join(k for k in same if old.get(k) != meta[k])}); "
                         "rerun with those, or give another --out")
    # held-out sequences are keyed by their index in the text, so a rerun with a larger --heldout adds
    # the earlier sequences to the ones already read
    old["heldout_sequences"] = sorted(set(old["heldout_sequences"]) | set(meta["heldout_sequences"]))
    data.setdefault("points", {})
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    # -- the learned gate: distilled once from the training sequences, saved, reused by every budget --
    gate_file = state_dir / "gate.safetensors"
    gate_state = None
    if any(s.startswith("learned") for s in args.selectors):
        from safetensors.torch import load_file, save_file
        if gate_file.is_file():          # distilled by an earlier (or the main) run of this length
            gate_state = load_file(str(gate_file))
        else:
            plugin = attnlab.attach(model, "sparse", variant="learned", block_size=BLOCK, gate_dim=args.gate_dim)
            log(f"[gate] teacher pass over {args.train} x {args.length} tokens, then {args.gate_steps} steps per layer")
            gate_report = plugin.distil_gates(list(train), rows=args.gate_rows, steps=args.gate_steps, lr=args.gate_lr,
                                         log=log)
            gate_state = plugin.state_dict()
            plugin.detach()
            save_file(gate_state, str(gate_file))
            t, g = gate_report["teacher"], gate_report["training"]
            data["gate"] = {"teacher_seconds": t["seconds"], "teacher_seconds_per_token": t["seconds"] / t["tokens"],
                            "training_seconds": g["seconds"], "training_seconds_per_token": g["seconds"] / g["tokens"],
                            "tokens": t["tokens"],
                            "layers": {str(i): {k: r[k] for k in ("before", "after", "rows", "steps")}
                                       for i, r in gate_report["layers"].items()}}
            save(out, data)

    # -- per held-out sequence: the dense reference once, then every budget --------------------------
    points = [] if args.metrics_only else [(s, b) for s in args.selectors for b in BUDGETS[s]]
    for i, seq in enumerate([] if args.metrics_only else heldout):
        si = n - args.heldout + i                  # the sequence's index in the text
        todo = [(s, b) for s, b in points if str(si) not in data["points"].get(key(s, b), {}).get("sequences", {})]
        dense_key = "dense"
        if not todo and str(si) in data["points"].get(dense_key, {}).get("sequences", {}):
            continue
        x = seq.view(1, -1)
        start = time.perf_counter()
        with torch.no_grad():
            dense_logits = model(input_ids=x, use_cache=False).logits
        entry = data["points"].setdefault(dense_key, {"selector": "dense", "budget": {}, "sequences": {}})
        entry["sequences"][str(si)] = {**token_stats(dense_logits, seq, None), "density": 1.0, "work": 1.0,
                                       "seconds": time.perf_counter() - start}
        dense_logp = F.log_softmax(dense_logits[0, :-1].float(), -1)
        del dense_logits
        save(out, data)
        for s, b in todo:
            plugin = attach(model, s, b, args, gate_state)
            start = time.perf_counter()
            with torch.no_grad():
                logits = model(input_ids=x, use_cache=False).logits
            row = token_stats(logits, seq, dense_logp)
            row.update(density=1 - plugin.sparsity(), seconds=time.perf_counter() - start)
            if args.kernel == "gather":   # pairs scored / causal pairs, every layer
                causal = model.config.num_attention_heads * len(plugin.layers()) * len(seq) * (len(seq) + 1) / 2
                row["work"] = plugin.pairs_scored() / causal
            del logits
            plugin.detach()
            pe = data["points"].setdefault(key(s, b), {"selector": s, "budget": b, "sequences": {}})
            pe["sequences"][str(si)] = row
            save(out, data)
            log(f"[{key(s, b)}] seq {si}: density {row['density']:.3f}, nll/token {row['nll'] / row['tokens']:.4f}, "
                f"KL {row['kl'] / row['tokens']:.4f}, {row['seconds']:.0f} s")
        del dense_logp

    # -- attention MSE (causal entries) and gradient cosine at the headline budgets, per sequence ----
    if args.metric_sequences:
        chosen = list(range(n - args.heldout, n))[:args.metric_sequences]
        metrics = data.get("metrics", {})
        if "heldout_sequences" in metrics:    # the older format: one value pooled over a set of sequences
            log(f"[metrics] replacing the pooled metrics of sequences {metrics['heldout_sequences']} by per-sequence ones")
            metrics = {}
        data["metrics"] = metrics
        for si, seq in zip(chosen, heldout):
            todo = [s for s in args.selectors if str(si) not in metrics.get(key(s, HEADLINE[s]), {})]
            exs = [Example(input_ids=seq.tolist(), labels=seq.tolist(), prompt_len=0)]
            dense_grad = None
            for s in todo:
                k = key(s, HEADLINE[s])
                plugin = attach(model, s, HEADLINE[s], args, gate_state)
                start = time.perf_counter()
                mse = attention_mse(model, exs, tok.pad_token_id, batch_size=1)
                if dense_grad is None:      # once per sequence: the dense reference ignores the selector
                    dense_grad = attention_gradients(model, plugin, exs, tok.pad_token_id, 1, dense=True)
                sparse_grad = attention_gradients(model, plugin, exs, tok.pad_token_id, 1, dense=False)
                cos = F.cosine_similarity(dense_grad, sparse_grad, dim=0).item()
                plugin.detach()
                metrics.setdefault(k, {})[str(si)] = {"attention_mse": mse, "grad_cosine": cos,
                                                      "seconds": time.perf_counter() - start}
                save(out, data)
                log(f"[{k}] seq {si}: attention MSE {mse:.3g}, gradient cosine {cos:.4f}")
    summarise(data)
    save(out, data)
    print(report(data))


def complete(data: dict) -> list[str]:
    """The held-out sequences read by dense and by every budget: every summary and comparison uses
    exactly these (a run stopped mid-sequence leaves that sequence out until it is finished)."""
    common = set(data["points"].get("dense", {}).get("sequences", {}))
    for p in data["points"].values():
        common &= set(p["sequences"])
    return sorted(common, key=int)


def summarise(data: dict) -> None:
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
    data["comparisons"] = compare(data, seqs) if len(seqs) >= MIN_SEQUENCES else []


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


def compare(data: dict, seqs: list[str]) -> list[dict]:
    """A against B at equal density: per sequence, the difference of their interpolated NLL per token
    (every sequence has the same number of tokens); change = exp(mean difference) - 1 is A's
    perplexity over B's, with a percentile-bootstrap 95% interval over sequences and a t-interval
    (mean ± t·sd/√n of the differences, then exp − 1). With few sequences the bootstrap cannot see
    more spread than those texts show and is too narrow; the report calls a difference outside noise
    only when both intervals exclude zero."""
    rows = []
    for a, b in COMPARE:
        for target in DENSITIES:
            va, vb = at_density(data, a, target, seqs), at_density(data, b, target, seqs)
            if va is None or vb is None:
                continue
            d = va - vb
            change, lo, hi = bootstrap_ci(d, stat=lambda x: math.exp(float(np.mean(x))) - 1)
            t_lo, t_hi = (math.exp(x) - 1 for x in t_interval(d))
            rows.append({"a": a, "b": b, "density": target, "change": change, "lo": lo, "hi": hi,
                         "t_lo": t_lo, "t_hi": t_hi,
                         "a_better_on": int((d < 0).sum()), "sequences": len(d)})
    return rows


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
    order = list(BUDGETS)
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
    if data.get("gate"):
        g = data["gate"]
        lines += ["", f"Gate distillation: teacher pass {g['teacher_seconds']:.0f} s for {g['tokens']} tokens "
                  f"({g['teacher_seconds_per_token'] * 1e3:.1f} ms/token), gate training {g['training_seconds']:.0f} s "
                  f"({g['training_seconds_per_token'] * 1e3:.1f} ms/token)."]
        kl = [(r["before"]["heldout"], r["after"]["heldout"]) for r in g["layers"].values()]
        lines.append(f"Held-out KL(target ‖ gate), mean over layers: {sum(a for a, _ in kl) / len(kl):.3f} → "
                     f"{sum(b for _, b in kl) / len(kl):.3f}.")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lowest = 0.0
    for sel in BUDGETS:
        pts = sorted((p["summary"]["density"], p["summary"]["ppl_change"] * 100, p["summary"]["ppl_change_lo"],
                      p["summary"]["ppl_change_hi"])
                     for p in data["points"].values() if p.get("selector") == sel and "summary" in p)
        if pts:
            x, y = [q[0] for q in pts], [q[1] for q in pts]
            lo = [q[2] * 100 if q[2] is not None else q[1] for q in pts]
            hi = [q[3] * 100 if q[3] is not None else q[1] for q in pts]
            line, = ax.plot(x, y, marker="o", label=sel)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            lowest = min(lowest, min(lo))
    ax.axhline(2, color="grey", lw=0.8, ls="--", label="goal: +2%, at density <= 0.25")
    ax.axvline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("density (causal pairs kept)")
    ax.set_ylabel("perplexity vs dense (%)")
    ax.set_yscale("symlog", linthresh=2)
    ax.set_ylim(bottom=lowest)
    n = data["points"].get("dense", {}).get("summary", {}).get("sequences", 0)
    text = data["meta"]["text"]
    text = "WikiText-2 validation" if "wikitext-2" in text and text.endswith("valid.txt") else Path(text).name
    ax.set_title(f"held-out {text}, {data['meta']['length']} tokens x {n} sequence{'s' * (n != 1)}, all 30 layers sparse\n"
                 "(shaded: 95% bootstrap interval over sequences)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
