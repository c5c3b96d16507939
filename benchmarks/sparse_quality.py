"""Density against quality of the sparse attentions on held-out WikiText-2, every layer sparse.

    python benchmarks/sparse_quality.py --length 2048 --train 12 --heldout 16 --gate-steps 2000 --metric-sequences 8
    python benchmarks/sparse_quality.py --length 4096 --train 6 --heldout 7 --gate-steps 2000
    python benchmarks/sparse_quality.py --length 2048 --report      # tables; the curves next to the JSON (.png)
    python benchmarks/sparse_quality.py --length 2048 --report --publish   # ... and into docs/img/ (the docs' figure)
    python benchmarks/sparse_quality.py --length 2048 --split validation --validation 8 --heldout 16 --train 96 \
        --top-k 1 2 4 --selectors learned --out benchmarks/results/sparse_gate_ablation/n96.json   # one ablation
    python benchmarks/sparse_quality.py --length 2048 --split validation --validation 8 --heldout 16 --train 96 \
        --block-size 32 --top-k 7 --window 320 --selectors learned quest window --gate-target mass \
        --recover-steps 200 --out benchmarks/results/sparse_recovery/recovered.json   # recovery, the same for each

(the runs in docs/sparse_attention.md, on one CPU thread: ~5 min per held-out sequence at 2048 tokens
and ~20 at 4096, ~5 min per metric sequence; the teacher pass and gate training ~4-5 min per length)

The text (../shared/data/wikitext-2/valid.txt) is tokenized once and cut into non-overlapping
sequences of --length tokens: the learned gates are distilled from the FIRST --train sequences, the
metrics read on the LAST --heldout ones (never used for distillation). With --split validation the
metrics read instead the --validation sequences just before those --heldout ones (so --heldout must
be named, as the held-out run's: 16 at 2048 tokens): the recipe's
ablations are chosen there, and the held-out sequences are read once, by the chosen recipe. Intervals: 95% bootstrap over
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

The recipe (teacher pass, gate training, the sweep, the summaries and the comparisons at equal
density) lives in attnlab/modules/sparse/recipe.py and quality.py, which `attnlab run` with a
`distill:` block calls too; this script adds the text, the resumable JSON, the metrics and the plots.
"""

from __future__ import annotations

import json
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
from attnlab.modules.sparse import quality, recipe  # noqa: E402
from attnlab.modules.sparse.quality import budgets, key  # noqa: E402
from benchmarks.sparse_quality_args import (BLOCK, BUDGETS, COUNTS, DEFAULT_SELECTORS, HEADLINE,  # noqa: E402,F401
                                            MODEL, check_budgets, check_flags, parse)

COMPARE = quality.COMPARE
DENSITIES = quality.DENSITIES
MIN_SEQUENCES = quality.MIN_SEQUENCES


def headline(selector: str, args) -> dict:
    """The budget the metrics read for `selector`: HEADLINE (v2, block 64), or with --headline-top-k
    that top-k for the top-k selectors (e.g. 7 at block 32, near a quarter of the pairs at 2048)."""
    k = getattr(args, "headline_top_k", None)
    return {"top_k": k} if k is not None and "top_k" in HEADLINE[selector] else HEADLINE[selector]


def common(args) -> dict:
    """The options every selector shares (recipe.options picks what each needs)."""
    out = {"block_size": args.block_size, "kernel": args.kernel, "granularity": args.granularity, "gate_dim": args.gate_dim,
           "rank": args.rank}
    return {**out, "gate_quest": True} if args.gate_quest else out


def attach(model, selector: str, budget: dict, args, gate_state):
    """The selector at this budget on every layer; the learned ones with the distilled gate."""
    return recipe.attach(model, selector, budget, common(args), gate_state)


def selector_budgets(selector: str, args) -> list[dict]:
    """The selector's budgets at --block-size; --top-k replaces those of the top-k selectors (quest,
    learned, oracle: e.g. 5 7 11 at block 32 keep about the tokens of 1 2 4 at block 64), and --window
    those of the window (tokens, 4 sinks each: e.g. a window near a top-k budget's density)."""
    own = budgets(args.block_size)[selector]
    if selector == "window" and getattr(args, "window", None):
        return [{"window": w, "sinks": 4} for w in args.window]
    if args.top_k is None or not any("top_k" in b for b in own):
        return own
    return [{"top_k": k} for k in args.top_k]


def read_text(spec: str) -> str:
    """The distillation text of --train-text: python_docs (Python's own documentation, offline), a
    .jsonl of {question, answer} rows (GSM8K: each problem and its solution), or a text file."""
    if spec == "python_docs":
        from pydoc_data import topics
        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    path = Path(spec)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows)
    return path.read_text()


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def gate_settings(args) -> dict:
    """The gate's settings recorded in the JSON's meta (args.gate_unit resolved: default, the granularity)."""
    out = {"rows": args.gate_rows, "steps": args.gate_steps, "lr": args.gate_lr, "dim": args.gate_dim}
    if args.gate_target != "peak":        # the earlier files have no key: peak
        out["target"] = args.gate_target
    args.gate_unit = args.gate_unit or args.granularity
    if args.gate_unit != "row":           # ... nor this one: row
        out["unit"] = args.gate_unit
    if args.gate_quest:                   # ... nor this one: off
        out["quest"] = True
    return out


def merge_meta(data: dict, meta: dict, out: Path) -> dict:
    """The JSON's meta with this run's `meta` merged in (its command, its held-out sequences); a run
    with other model, length, training or gate settings is refused (SystemExit, one line)."""
    old = data.setdefault("meta", meta)
    commands = old.setdefault("commands", [old["command"]])   # every run that added to this JSON
    if meta["command"] not in commands:
        commands.append(meta["command"])
    old.setdefault("split", "heldout")       # the files written before --split read the held-out sequences
    old.setdefault("granularity", "block" if out.stem.endswith("_block") else "row")   # ... and had no key for it
    old.setdefault("train_text", old["text"])
    if "gate" not in data and not any(p["selector"].startswith("learned") for p in data.get("points", {}).values()):
        old["gate"] = meta["gate"]           # no gate distilled or read yet: its settings describe nothing
    same = ("model", "length", "block_size", "text", "train_sequences", "gate", "split", "granularity", "train_text",
            "recover")
    if "lowrank" in meta:                    # only a run that reads lowrank fits or checks its indexer
        if not any(p["selector"] == "lowrank" for p in data.get("points", {}).values()):
            old["lowrank"] = meta["lowrank"]
        same += ("lowrank",)
    if any(old.get(k) != meta.get(k) for k in same):
        raise SystemExit(f"{out} holds a run with other settings ({', '.join(k for k in same if old.get(k) != meta.get(k))}); "
                         "rerun with those, or give another --out")
    # held-out sequences are keyed by their index in the text, so a rerun with a larger --heldout adds
    # the earlier sequences to the ones already read
    old["heldout_sequences"] = sorted(set(old["heldout_sequences"]) | set(meta["heldout_sequences"]))
    return old


def main(argv=None):
    args = parse(argv, __doc__)
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
    state_dir = ROOT / "runs" / out.stem          # the gate belongs to its JSON: another --out, another gate
    check_flags(args, state_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    bb = attnlab.load_backbone(MODEL)
    model, tok = bb.model, bb.tokenizer
    ids = torch.tensor(tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"])
    n = len(ids) // args.length
    if args.train + args.heldout > n:
        raise SystemExit(f"{len(ids)} tokens make {n} sequences of {args.length}; --train + --heldout must fit")
    seqs = ids[:n * args.length].view(n, args.length)
    first = n - args.heldout - (args.validation if args.split == "validation" else 0)
    count = args.validation if args.split == "validation" else args.heldout
    if args.train > first:
        raise SystemExit(f"--train {args.train} overlaps the {args.split} sequences {first}..{first + count - 1}: "
                         f"use --train {first} or fewer")
    train, heldout = seqs[:args.train], seqs[first:first + count]
    if args.train_text:
        other = torch.tensor(tok(read_text(args.train_text), add_special_tokens=False)["input_ids"])
        if len(other) // args.length < args.train:
            raise SystemExit(f"--train-text {args.train_text} makes {len(other) // args.length} sequences of "
                             f"{args.length} tokens: use --train {len(other) // args.length} or fewer")
        train = other[:args.train * args.length].view(args.train, args.length)
    data = load(out)
    gate_meta = gate_settings(args)
    meta = {"model": MODEL, "length": args.length, "block_size": args.block_size, "text": args.text,
            "text_tokens": len(ids), "sequences": n, "train_sequences": list(range(args.train)),
            "split": args.split, "heldout_sequences": list(range(first, first + count)), "kernel": args.kernel,
            "granularity": args.granularity, "train_text": args.train_text or args.text,
            "gate": gate_meta,
            "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if args.recover_steps:
        meta["recover"] = {"steps": args.recover_steps, "lr": args.recover_lr, "r": args.recover_r}
    if "lowrank" in args.selectors:
        meta["lowrank"] = {"rank": args.rank, "calibrate": args.calibrate}
    merge_meta(data, meta, out)
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
            plugin = attnlab.attach(model, "sparse", variant="learned", block_size=args.block_size,
                                    gate_dim=args.gate_dim, gate_quest=args.gate_quest)
            log(f"[gate] teacher pass over {args.train} x {args.length} tokens, then {args.gate_steps} steps per layer")
            gate_record = recipe.distil(plugin, train, rows=args.gate_rows, steps=args.gate_steps, lr=args.gate_lr,
                                        log=log, target=args.gate_target, teacher_file=args.teacher_cache,
                                        unit=args.gate_unit)
            gate_state = plugin.state_dict()
            plugin.detach()
            save_file(gate_state, str(gate_file))
            data["gate"] = gate_record
            save(out, data)

    # -- the lowrank indexer: fitted in closed form from the first --calibrate training sequences ------
    if "lowrank" in args.selectors:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open
        index_file = state_dir / "lowrank.safetensors"
        fitted_by = {"calibrate": str(args.calibrate), "length": str(args.length), "train_text": args.train_text or ""}
        if index_file.is_file():
            with safe_open(str(index_file), "pt") as f:
                saved = f.metadata() or {}       # the first runs' files carry none
            if any(saved.get(k, v) != v for k, v in fitted_by.items()):
                raise SystemExit(f"{index_file} was fitted with other settings ({saved}); rerun with those, or give "
                                 f"another --out")
            index_state = load_file(str(index_file))
        else:
            plugin = attnlab.attach(model, "sparse", **recipe.options("lowrank", {"top_k": 1}, common(args)))
            log(f"[lowrank] fitting the rank-{args.rank} indexer from {args.calibrate} x {args.length} tokens")
            data["lowrank"] = plugin.calibrate(list(train[:args.calibrate]))
            index_state = plugin.state_dict()
            plugin.detach()
            save_file(index_state, str(index_file), metadata=fitted_by)
            save(out, data)
        gate_state = {**(gate_state or {}), **index_state}

    # -- per held-out sequence (keyed by its index in the text): dense once, then every budget --------
    points = [] if args.metrics_only else [(s, b) for s in args.selectors for b in selector_budgets(s, args)]
    if args.recover_steps:
        from safetensors.torch import load_file, save_file
        from attnlab.modules.sparse.recovery import sweep_recovered
        adapters_file = state_dir / "adapters.safetensors"
        flat = load_file(str(adapters_file)) if adapters_file.is_file() else {}
        adapters = {}
        for name, v in flat.items():                  # "point key|parameter name" -> tensor
            k, param = name.split("|", 1)
            adapters.setdefault(k, {})[param] = v

        def keep(d):                                  # the JSON and the finished adapters, together
            save_file({f"{k}|{n}": v for k, st in adapters.items() for n, v in st.items()}, str(adapters_file))
            save(out, d)

        sweep_recovered(model, list(train), {first + i: seq for i, seq in enumerate(heldout)}, points, common(args),
                        gate_state, data, adapters, steps=args.recover_steps, lr=args.recover_lr, r=args.recover_r,
                        save=keep, log=log)
    else:
        recipe.sweep(model, {} if args.metrics_only else {first + i: seq for i, seq in enumerate(heldout)},
                     points, common(args), gate_state, data, save=lambda d: save(out, d), log=log,
                     count_work=args.kernel == "gather")

    # -- attention MSE (causal entries) and gradient cosine at the headline budgets, per sequence ----
    if args.metric_sequences:
        chosen = list(range(first, first + count))[:args.metric_sequences]
        metrics = data.get("metrics", {})
        if "heldout_sequences" in metrics:    # the older format: one value pooled over a set of sequences
            log(f"[metrics] replacing the pooled metrics of sequences {metrics['heldout_sequences']} by per-sequence ones")
            metrics = {}
        data["metrics"] = metrics
        for si, seq in zip(chosen, heldout):
            todo = [s for s in args.selectors if str(si) not in metrics.get(key(s, headline(s, args)), {})]
            exs = [Example(input_ids=seq.tolist(), labels=seq.tolist(), prompt_len=0)]
            dense_grad = None
            for s in todo:
                k = key(s, headline(s, args))
                plugin = attach(model, s, headline(s, args), args, gate_state)
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


complete, at_density, report = quality.complete, quality.at_density, quality.report


def summarise(data: dict) -> None:
    """quality.summarise with this benchmark's comparisons and densities."""
    quality.summarise(data, COMPARE, DENSITIES)


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
    from attnlab.errors import AttnlabError
    try:
        main()
    except AttnlabError as e:     # one line naming the fix, as the attnlab CLI prints it
        raise SystemExit(f"sparse_quality: error: {' '.join(str(e).split())}") from None
