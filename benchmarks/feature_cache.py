"""Epoch time of head-only training from the feature cache against recomputing the frozen base.

    python benchmarks/feature_cache.py [--model smollm2-135m] [--n 64] [--method backward_head]

Same examples, same order, same steps; the cached run reads fp16 hidden states, the live run runs
the frozen body every step. Times are measured as wall time and as this process's CPU time; with
one thread (OMP_NUM_THREADS=1) the CPU time is the work done even on a machine shared with other
jobs, so the results file's ratios are of CPU time. Reports both epoch times, the speed-up, and the largest difference
between the two loss curves (fp16 rounding of the cached states). The bound on the speed-up is
(body + head) / head: the body's forward time over the epoch's batches (measured alone, no
gradient, as the live run needs it) plus the cached epoch, over the cached epoch. A cache that
wastes no work gets close to it (goal: >= 80% of the bound).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import attnlab
from attnlab.data import build_splits, collate
from attnlab.evaluate import target_hidden
from attnlab.features import build_feature_cache
from attnlab.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from record import write_result  # noqa: E402  (imported first: it notes the start time and load)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="training examples (one epoch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="backward_head")
    ap.add_argument("--preset", default="residual")
    ap.add_argument("--out", default=None, help="write the results as JSON here (with the command)")
    a = ap.parse_args()
    bb = attnlab.load_backbone(a.model)
    pad = bb.tokenizer.pad_token_id
    s = build_splits({"dataset_name": "arithmetic", "n_train": a.n, "n_val": 0, "n_eval": 1, "max_length": 192}, bb.tokenizer)
    cfg = TrainConfig(steps=a.n // a.batch_size, batch_size=a.batch_size, lr=1e-3, warmup_steps=1, progress=False)
    opts = {"preset": a.preset} if a.method == "backward_head" else {}
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        cache = build_feature_cache(bb.model, bb.spec, s.train, pad, a.batch_size, root=root, log=lambda *_: None)
        t_build = time.perf_counter() - t
        res = {}
        for mode, feats in (("live", None), ("cache", cache)):
            torch.manual_seed(0)
            p = attnlab.attach(bb.model, a.method, **opts)
            t, c = time.perf_counter(), time.process_time()
            r = train(bb.model, p, s.train, cfg, pad_id=pad, features=feats)
            res[mode] = (time.perf_counter() - t, time.process_time() - c, [h["loss"] for h in r.history])
            p.detach()
        # the body alone on the same batches (the work the cache saves)
        order = torch.randperm(len(s.train), generator=torch.Generator().manual_seed(0)).tolist()
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for i in range(0, cfg.steps * a.batch_size, a.batch_size):
                batch = collate([s.train[order[j % len(order)]] for j in range(i, i + a.batch_size)], pad)
                target_hidden(bb.model, batch)
        body = (time.perf_counter() - t, time.process_time() - c)
    live, cached = res["live"], res["cache"]
    diff = max(abs(x - y) for x, y in zip(live[2], cached[2]))
    label = f"{a.method} ({a.preset})" if a.method == "backward_head" else a.method
    print(f"model {a.model}, {label}, {a.n} examples x 1 epoch, batch {a.batch_size}, "
          f"{s.report['train_target_tokens']} target tokens, {torch.get_num_threads()} threads")
    # k = 0: wall time; k = 1: this process's CPU time (with one thread the work done, whatever else runs)
    bound = [(body[k] + cached[k]) / cached[k] for k in (0, 1)]
    speed = [live[k] / cached[k] for k in (0, 1)]
    print("| clock | epoch from the base (live) s | epoch from the cache s | speed-up | bound (body + head) / head "
          "| speed-up / bound | max loss-curve diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, clock in enumerate(("wall", "CPU")):
        print(f"| {clock} | {live[k]:.1f} | {cached[k]:.2f} | {speed[k]:.1f}× | {bound[k]:.1f}× | "
              f"{100 * speed[k] / bound[k]:.0f}% | {diff:.2e} |")
    print(f"one-time cache build: {t_build:.1f} s (wall)")
    if a.out:
        write_result(a.out, {"model": a.model, "method": a.method, "preset": a.preset if a.method == "backward_head"
                             else None, "n": a.n, "batch_size": a.batch_size,
                             "target_tokens": s.report["train_target_tokens"], "build_s": t_build,
                             "max_loss_diff": diff, "clock": "cpu",
                             "live_s": live[1], "cache_s": cached[1], "body_s": body[1], "speedup": speed[1],
                             "bound": bound[1], "of_bound": speed[1] / bound[1],
                             "wall": {"live_s": live[0], "cache_s": cached[0], "body_s": body[0], "speedup": speed[0],
                                      "bound": bound[0], "of_bound": speed[0] / bound[0]}})

if __name__ == "__main__":
    main()
