"""Seconds per optimizer step of each arm of configs/backward_head_gsm8k_fair.yaml, to size its budget.

    python benchmarks/backward_head_step_times.py [--steps 3]

One batch of 16 GSM8K training problems (the config's slices and batch size), `--steps` optimizer
steps per arm after one warm-up step; head-only arms train from a feature cache of those problems
(as `attnlab run` does), attention LoRA runs the body. Also the one-time cost of `init: base`
(the data-free fit at attach and the refit on the training hidden states). Timings on a shared
2-core CPU are noisy: the table says what else ran. `CPU s / step` is this process's CPU time
(time.process_time, all its threads): with one thread (OMP_NUM_THREADS=1) it is what a step costs
on one dedicated core, whatever else shares the machine; `--validate` adds one validation pass
(the loss on the config's 64 validation problems, as `attnlab run` computes it every eval_every steps).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import attnlab
from attnlab.data import build_splits
from attnlab.evaluate import base_reference, score
from attnlab.features import build_feature_cache
from attnlab.train import TrainConfig, train

GSM8K = {"dataset_name": "gsm8k", "path": "../shared/data/gsm8k/train.jsonl", "n_train": 512, "n_val": 64,
         "n_eval": 128, "max_length": 320}
ARMS = [
    ("bah_paper_base", "backward_head", {"preset": "paper", "init": "base"}),
    ("bah_residual", "backward_head", {"preset": "residual"}),
    ("lmhead_lora r=20", "lora", {"r": 20, "alpha": 20, "target_modules": ["lm_head"]}),
    ("mos_head K=2 r=432", "mos_head", {"n_components": 2, "rank": 432}),
    ("mos_head K=3 r=288", "mos_head", {"n_components": 3, "rank": 288}),
    ("mos_head K=4 r=216", "mos_head", {"n_components": 4, "rank": 216}),
    ("attention lora r=8", "lora", {"r": 8, "alpha": 16}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="arm names (prefixes) to time")
    ap.add_argument("--validate", action="store_true", help="also time one validation pass per arm")
    a = ap.parse_args()
    bb = attnlab.load_backbone("smollm2-135m")
    pad = bb.tokenizer.pad_token_id
    splits = build_splits(GSM8K, bb.tokenizer)
    ex = splits.train[:16]
    print(f"{sum(e.n_target for e in ex)} target tokens per step, {torch.get_num_threads()} threads", flush=True)
    ref = base_reference(bb.model, splits.val, pad, 32) if a.validate else None
    with tempfile.TemporaryDirectory() as root:
        cache = build_feature_cache(bb.model, bb.spec, ex, pad, 16, root=root, log=lambda *_: None)
        rows = []
        for name, method, opts in ARMS:
            if a.only and not any(name.startswith(o) for o in a.only):
                continue
            t = time.perf_counter()
            p = attnlab.attach(bb.model, method, **opts)
            t_attach = time.perf_counter() - t
            feats = cache if p.head_only else None
            cfg = dict(batch_size=16, lr=1e-3, warmup_steps=0, progress=False)
            t = time.perf_counter()
            train(bb.model, p, ex, TrainConfig(steps=1, **cfg), pad_id=pad, features=feats)
            t_first = time.perf_counter() - t
            t, c = time.perf_counter(), time.process_time()
            train(bb.model, p, ex, TrainConfig(steps=a.steps, **cfg), pad_id=pad, features=feats)
            per_step, cpu_step = (time.perf_counter() - t) / a.steps, (time.process_time() - c) / a.steps
            val_cpu = float("nan")
            if a.validate:
                c = time.process_time()
                score(bb.model, splits.val, pad, 32, reference=ref, body_frozen=p.head_only)
                val_cpu = time.process_time() - c
            rows.append((name, p.num_trainable(), t_attach, t_first, per_step, cpu_step, val_cpu))
            print(f"| {name} | {p.num_trainable():,} | {t_attach:.1f} | {t_first:.1f} | {per_step:.2f} | "
                  f"{cpu_step:.2f} | {val_cpu:.1f} |", flush=True)
            p.detach()
    print("\n| arm | trainable | attach s | first step s (incl. init: base refit) | s / step | CPU s / step "
          "| CPU s / validation |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, ta, tf, ps, cs, vc in rows:
        print(f"| {name} | {n:,} | {ta:.1f} | {tf:.1f} | {ps:.2f} | {cs:.2f} | {vc:.1f} |")


if __name__ == "__main__":
    main()
