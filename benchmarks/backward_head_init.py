"""How close does the literal Backward Attention head start to the base? (`init: uniform` vs `init: base`)

    python benchmarks/backward_head_init.py [--out docs/results/backward_head_init.md]

The GSM8K slices of configs/backward_head_gsm8k.yaml (and WikiText-2, ../shared/data): perplexity,
KL(base || head) and top-1 agreement with the base, measured on the held-out test split with the
head exactly as it is at step 0 (no training), for
  * `init: uniform`           the 0.02-std start (today's default, scores near zero);
  * per-row scale             u = h / mean(r): scores_v = (r_v / mean r) * logit_v, the base up to the
                              per-row RMS scale the head's RMSNorm'd rows impose;
  * `init: base`, data-free   the weighted least-squares start with uniform token weights;
  * `init: base`, fitted      token weights from the first 64 training problems' hidden states (what
                              the trainer does at the start of a fresh run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import attnlab
from attnlab import attach
from attnlab.data import build_splits
from attnlab.evaluate import base_reference, score
from attnlab.modules.backward_head_init import fit_base_start, set_map

GSM8K = {"dataset_name": "gsm8k", "path": "../shared/data/gsm8k/train.jsonl", "n_train": 512, "n_val": 64,
         "n_eval": 128, "max_length": 320}
WIKI = {"dataset_name": "wikitext", "path": "../shared/data/wikitext-2/valid.txt", "n_train": 64, "n_val": 0,
        "n_eval": 64, "max_length": 256}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None, help="write the markdown table here (atomically)")
    a = ap.parse_args()
    t0 = time.time()
    bb = attnlab.load_backbone(a.model)
    m, pad = bb.model, bb.tokenizer.pad_token_id
    rows = []
    fit_on = None
    for name, data in (("GSM8K test (128 problems)", GSM8K), ("WikiText-2 (64 blocks)", WIKI)):
        s = build_splits(data, bb.tokenizer)
        ref = base_reference(m, s.eval, pad, 16)
        if fit_on is None:  # the token weights come from GSM8K train, as in the GSM8K runs
            fit_on = base_reference(m, s.train[:64], pad, 16).hidden
        res = {"frozen": score(m, s.eval, pad, 16, reference=ref, body_frozen=True)}
        for label in ("init: uniform", "per-row scale", "init: base, data-free", "init: base, fitted"):
            p = attach(m, "backward_head", preset="paper", init="uniform" if label == "init: uniform" else "base")
            head = m.get_output_embeddings()
            if label == "per-row scale":
                emb = head._base["emb"].double()
                rbar = torch.rsqrt(emb.pow(2).mean(-1) + 1e-6).mean()
                set_map(head, torch.linalg.inv(head._base["out_w"].double().t() @ head.constants()["R"].double()) / rbar)
            elif label == "init: base, fitted":
                fit_base_start(head, fit_on)
            res[label] = score(m, s.eval, pad, 16, reference=ref, body_frozen=True)
            p.detach()
        for label, r in res.items():
            rows.append((name, label, r))
            print(name, label, f"ppl {r['perplexity']:.3f}", f"kl {r.get('kl_base_model', 0):.4f}", flush=True)
    lines = ["# The literal Backward Attention head at step 0: how close each start is to the base", "",
             f"Command: `python benchmarks/backward_head_init.py --out docs/results/backward_head_init.md` "
             f"(model {a.model}, {time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s on 2 CPU cores).", "",
             "No training: the `paper` head (d = E = 576) as attached. Token weights of the fitted start: the "
             "base's mean next-token distribution over the first 64 GSM8K training problems' target positions "
             "(disjoint from both test sets).", "",
             "| test set | start | perplexity | vs base | KL(base ‖ head) nats/token | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|"]
    for name, label, r in rows:
        base = next(x for n, lab, x in rows if n == name and lab == "frozen")
        rel = 100 * (r["perplexity"] / base["perplexity"] - 1)
        lines.append(f"| {name} | {label} | {r['perplexity']:.4g} | {rel:+.1f}% | {r.get('kl_base_model', 0):.4f} | "
                     f"{r.get('top1_agreement', 1.0):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        from attnlab.atomic import write_text_atomic
        write_text_atomic(Path(a.out), text)


if __name__ == "__main__":
    sys.exit(main())
