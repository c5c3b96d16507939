"""Density against quality of the sparse attentions on held-out WikiText-2, every layer sparse.

    python benchmarks/sparse_quality.py --length 2048 --train 12 --heldout 3 --gate-steps 2000 --metric-sequences 2
    python benchmarks/sparse_quality.py --length 4096 --train 6 --heldout 1 --gate-steps 2000
    python benchmarks/sparse_quality.py --length 2048 --report      # tables, docs/img/sparse_quality_2048.png

(the runs in docs/sparse_attention.md: ~29 and ~21 min on one CPU thread)

The text (../shared/data/wikitext-2/valid.txt) is tokenized once and cut into non-overlapping
sequences of --length tokens: the learned gates are distilled from the FIRST --train sequences, the
metrics read on the LAST --heldout ones (never used for distillation). For each selector and budget
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

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402
from attnlab.data.tokenize import Example  # noqa: E402
from attnlab.distill import attention_gradients, attention_mse  # noqa: E402

BLOCK = 64
BUDGETS = {
    "window": [{"window": w, "sinks": 4} for w in (64, 128, 256, 512)],
    "quest": [{"top_k": k} for k in (1, 2, 4, 8)],
    "learned": [{"top_k": k} for k in (1, 2, 4, 8)],
    "learned-mass": [{"mass": m} for m in (0.5, 0.7, 0.9, 0.95)],
    "oracle": [{"top_k": k} for k in (1, 2, 4, 8)],
}
HEADLINE = {"window": {"window": 256, "sinks": 4}, "quest": {"top_k": 2}, "learned": {"top_k": 2},
            "learned-mass": {"mass": 0.9}, "oracle": {"top_k": 2}}


def options(selector: str, budget: dict, kernel: str) -> dict:
    variant = {"learned-mass": "learned", "oracle": "learned"}.get(selector, selector)
    out = {"variant": variant, "block_size": BLOCK, "kernel": kernel, **budget}
    if selector == "oracle":
        out["oracle"] = True
    return out


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
    ap.add_argument("--gate-rows", type=int, default=512, help="cached rows per sequence and layer")
    ap.add_argument("--gate-steps", type=int, default=2000)
    ap.add_argument("--gate-lr", type=float, default=3e-3)
    ap.add_argument("--gate-dim", type=int, default=64)
    ap.add_argument("--metric-sequences", type=int, default=0,
                    help="held-out sequences for attention MSE and gradient cosine (headline budgets; 0: skip)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_quality_<length>.json)")
    ap.add_argument("--report", action="store_true", help="only print the tables and draw the curves from the JSON")
    ap.add_argument("--metrics-only", action="store_true",
                    help="skip the curves: only attention MSE and gradient cosine (e.g. in a second process "
                         "with its own --out, once the main run has saved the gate)")
    args = ap.parse_args(argv)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"sparse_quality_{args.length}.json")
    if args.report:
        data = load(out)
        summarise(data)
        print(report(data))
        plot(data, ROOT / "docs" / "img" / f"sparse_quality_{args.length}.png")
        return
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
            opts = options(s, b, args.kernel)
            if s.startswith("learned"):
                opts["gate_dim"] = args.gate_dim
            plugin = attnlab.attach(model, "sparse", **opts)
            if s.startswith("learned"):
                plugin.load_state_dict(gate_state)
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

    # -- attention MSE (causal entries) and gradient cosine at the headline budgets ------------------
    if args.metric_sequences:
        exs = [Example(input_ids=s.tolist(), labels=s.tolist(), prompt_len=0) for s in heldout[:args.metric_sequences]]
        chosen = list(range(n - args.heldout, n))[:args.metric_sequences]
        metrics = data.setdefault("metrics", {"sequences": len(exs), "heldout_sequences": chosen})
        if metrics.get("heldout_sequences", chosen) != chosen:
            raise SystemExit(f"the metrics in {out} were read on sequences {metrics['heldout_sequences']}, this run "
                             f"would read {chosen}; rerun with the same --heldout and --metric-sequences")
        dense_grad = None
        for s in args.selectors:
            b = HEADLINE[s]
            k = key(s, b)
            if k in metrics:
                continue
            opts = options(s, b, args.kernel)
            if s.startswith("learned"):
                opts["gate_dim"] = args.gate_dim
            plugin = attnlab.attach(model, "sparse", **opts)
            if s.startswith("learned"):
                plugin.load_state_dict(gate_state)
            start = time.perf_counter()
            mse = attention_mse(model, exs, tok.pad_token_id, batch_size=1)
            if dense_grad is None:
                dense_grad = attention_gradients(model, plugin, exs, tok.pad_token_id, 1, dense=True)
            sparse_grad = attention_gradients(model, plugin, exs, tok.pad_token_id, 1, dense=False)
            cos = F.cosine_similarity(dense_grad, sparse_grad, dim=0).item()
            plugin.detach()
            metrics[k] = {"attention_mse": mse, "grad_cosine": cos, "seconds": time.perf_counter() - start}
            save(out, data)
            log(f"[{k}] attention MSE {mse:.3g}, gradient cosine {cos:.4f}")
    summarise(data)
    save(out, data)
    print(report(data))


def summarise(data: dict) -> None:
    """Per point: totals over its sequences, perplexity and changes against dense on the same sequences."""
    dense = data["points"].get("dense", {}).get("sequences", {})
    for name, p in data["points"].items():
        seqs = {i: r for i, r in p["sequences"].items() if i in dense}
        if not seqs:
            continue
        tot = {k: sum(r.get(k, 0) for r in seqs.values()) for k in ("tokens", "nll", "correct", "kl", "agree")}
        dtot = {k: sum(dense[i][k] for i in seqs) for k in ("tokens", "nll", "correct")}
        ppl, dppl = math.exp(tot["nll"] / tot["tokens"]), math.exp(dtot["nll"] / dtot["tokens"])
        p["summary"] = {"sequences": len(seqs), "tokens": tot["tokens"],
                        "density": sum(r["density"] for r in seqs.values()) / len(seqs),
                        "work": (sum(r["work"] for r in seqs.values()) / len(seqs)
                                 if all("work" in r for r in seqs.values()) else None),
                        "ppl": ppl, "ppl_change": ppl / dppl - 1, "kl": tot["kl"] / tot["tokens"],
                        "top1_agree": tot["agree"] / tot["tokens"] if name != "dense" else 1.0,
                        "accuracy": tot["correct"] / tot["tokens"],
                        "accuracy_vs_dense": tot["correct"] / max(dtot["correct"], 1)}


def report(data: dict) -> str:
    """Markdown: one row per budget (sorted by selector, then density), and the proposal's targets."""
    lines = ["| selector | budget | density | work | PPL | vs dense | KL(dense‖sparse) | top-1 = dense | accuracy ÷ dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(p["selector"], p["budget"], p["summary"]) for p in data["points"].values() if "summary" in p]
    order = list(BUDGETS)
    rows.sort(key=lambda r: (r[0] != "dense", order.index(r[0]) if r[0] in order else -1, r[2]["density"]))
    for sel, budget, m in rows:
        b = ", ".join(f"{k} {v}" for k, v in budget.items()) or "–"
        work = f"{m['work']:.2f}" if m.get("work") is not None else "–"
        lines.append(f"| {sel} | {b} | {m['density']:.3f} | {work} | {m['ppl']:.2f} | {m['ppl_change'] * 100:+.1f}% | "
                     f"{m['kl']:.4f} | {m['top1_agree']:.3f} | {m['accuracy_vs_dense']:.3f} |")
    if data.get("metrics"):
        lines += ["", f"Attention MSE over causal entries and gradient cosine ({data['metrics']['sequences']} held-out "
                  "sequences):", "", "| selector | budget | attention MSE | gradient cosine |", "|---|---|---:|---:|"]
        for k, m in data["metrics"].items():
            if isinstance(m, dict):
                lines.append(f"| {k.split(':')[0]} | {k.split(':')[1]} | {m['attention_mse']:.3g} | {m['grad_cosine']:.4f} |")
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
        pts = sorted((p["summary"]["density"], p["summary"]["ppl_change"] * 100)
                     for p in data["points"].values() if p.get("selector") == sel and "summary" in p)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=sel)
            lowest = min(lowest, min(y for _, y in pts))
    ax.axhline(2, color="grey", lw=0.8, ls="--", label="goal: +2%, at density <= 0.25")
    ax.axvline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("density (causal pairs kept)")
    ax.set_ylabel("perplexity vs dense (%)")
    ax.set_yscale("symlog", linthresh=2)
    ax.set_ylim(bottom=lowest)
    n = data["points"].get("dense", {}).get("summary", {}).get("sequences", 0)
    ax.set_title(f"held-out WikiText-2, {data['meta']['length']} tokens x {n} sequence{'s' * (n != 1)}, all 30 layers sparse",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
