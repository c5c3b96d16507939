"""The LM-head loss at target positions: F.linear + F.cross_entropy against F.linear_cross_entropy
(torch >= 2.13) in its modes, and attnlab's own vocabulary-chunked CE, side by side in one run.

    python benchmarks/linear_cross_entropy.py [--n 512 2048] [--grad w|x] [--rounds 2]

One training step of the loss summed over N target tokens, E = 576, V = 49152 (SmolLM2-135M's
head), fp32: forward + backward. `--grad w`: only the head W gets a gradient (head_ft: the hidden
states come from the frozen body or the feature cache); `--grad x`: only the hidden states do
(LoRA and the attention methods: the head is frozen, the gradient flows into the body).

Modes of F.linear_cross_entropy (see torch.nn.LinearCrossEntropyOptions):
  options=None (the default)  the reference path: literally F.cross_entropy(F.linear(...)), so the
                              N x V logits are kept for the backward exactly as before.
  LinearCrossEntropyOptions() chunks the N rows; on CPU fp32 "auto" resolves to the fallback
                              ("compact", "aspect_ratio:2"); gradients are computed in the forward.
  acc_policy="accurate"       the policy torch picks for CPU bf16/fp16.
  batch_chunk_size=256        chunks of 256 rows (chunking_method off), policy "auto" as above.
and attnlab.chunked_ce.mixture_cross_entropy with H = 1, which chunks the vocabulary instead:
`saved` keeps the N x V scores when they fit in 1 GiB, `recomputed` (save_bytes=0) never does.

Each variant runs in a fresh process (malloc's mmap threshold fixed at 128 KiB, so freed blocks go
back to the OS and the resident set follows the live tensors); memory is the growth of the peak
resident set (VmHWM, reset just before) over the resident set before the first step: inputs
excluded, W's gradient included. The tensor tracker of
attnlab.memory cannot be used here: it does not see inside the chunked custom op. Time is the
median of `--repeat` steps after that one (wall `time_s`, and `cpu_s`, this process's CPU time: with
BENCH_THREADS=1 the work done, whatever else shares the machine) (fewer once they took 30 s); `--rounds` runs the variants again, interleaved, and
the smallest median is kept (the machine may be shared). `maxdiff` is the larger of the relative
difference of the summed loss from the reference and the largest gradient difference relative to
the reference gradient's largest entry, in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_result  # noqa: E402  (imported first: it notes the start time and load)

E, V = 576, 49152
VARIANTS = ["linear+cross_entropy", "linear_cross_entropy (options=None)", "linear_cross_entropy (chunked, auto)",
            "linear_cross_entropy (chunked, accurate)", "linear_cross_entropy (chunked, 256 rows)",
            "attnlab chunked_ce (saved)", "attnlab chunked_ce (recomputed)"]


def loss_fn(name):
    from attnlab.chunked_ce import mixture_cross_entropy

    opts = torch.nn.LinearCrossEntropyOptions
    return {
        VARIANTS[0]: lambda X, W, t: F.cross_entropy(F.linear(X, W), t, reduction="sum"),
        VARIANTS[1]: lambda X, W, t: F.linear_cross_entropy(X, W, t, reduction="sum"),
        VARIANTS[2]: lambda X, W, t: F.linear_cross_entropy(X, W, t, reduction="sum", options=opts()),
        VARIANTS[3]: lambda X, W, t: F.linear_cross_entropy(X, W, t, reduction="sum",
                                                             options=opts(acc_policy="accurate")),
        VARIANTS[4]: lambda X, W, t: F.linear_cross_entropy(X, W, t, reduction="sum",
                                                             options=opts(batch_chunk_size=256)),
        VARIANTS[5]: lambda X, W, t: mixture_cross_entropy(X[None], W[None], t).sum(),
        VARIANTS[6]: lambda X, W, t: mixture_cross_entropy(X[None], W[None], t, save_bytes=0).sum(),
    }[name]


def inputs(n, grad):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, E, generator=g).requires_grad_(grad == "x")
    W = torch.randn(V, E, generator=g).mul_(0.05).requires_grad_(grad == "w")
    t = torch.randint(0, V, (n,), generator=g)
    return X, W, t


def step(fn, X, W, t):
    for p in (X, W):
        p.grad = None
    loss = fn(X, W, t)
    loss.backward()
    return loss.detach(), (X.grad if X.requires_grad else W.grad)


def _status_mib(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def reset_peak_rss():
    """Linux: make the peak resident set (VmHWM) the current one, so that the next peak is the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(name, n, grad, repeat, budget=30.0):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    X, W, t = inputs(n, grad)
    fn = loss_fn(name)
    ref = loss_fn(VARIANTS[0])
    reset_peak_rss()
    before = _status_mib("VmRSS")
    loss, g = step(fn, X, W, t)
    peak = _status_mib("VmHWM") - before
    ts, cs = [], []
    while len(ts) < repeat and (len(ts) < 1 or sum(ts) < budget):
        s, c = time.perf_counter(), time.process_time()
        step(fn, X, W, t)
        ts.append(time.perf_counter() - s)
        cs.append(time.process_time() - c)
    loss, g = loss.clone(), g.clone()
    ref_loss, ref_g = step(ref, X, W, t)
    # relative: of the summed loss, and of the gradient against its largest entry
    maxdiff = max(float((loss - ref_loss).abs() / ref_loss.abs()), float((g - ref_g).abs().max() / ref_g.abs().max()))
    return {"variant": name, "n": n, "grad": grad, "time_s": statistics.median(ts),
            "cpu_s": statistics.median(cs), "steps_timed": len(ts),
            "peak_mib": peak, "maxdiff": maxdiff, "loss": float(loss)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 2048], help="target tokens per step")
    ap.add_argument("--grad", choices=["w", "x"], nargs="+", default=["w", "x"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", type=int, default=list(range(len(VARIANTS))),
                    help="indices into: " + "; ".join(f"{i}: {v}" for i, v in enumerate(VARIANTS)))
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "N", "GRAD", "REPEAT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.worker[2], int(a.worker[3]))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    rows = []
    print(f"torch {torch.__version__}, {os.environ.get('BENCH_THREADS', '2')} threads, E={E}, V={V}, fp32; "
          f"time: smallest of {a.rounds} interleaved medians of {a.repeat} steps")
    for grad in a.grad:
        for n in a.n:
            runs = {}
            for _ in range(a.rounds):
                for i in a.variants:
                    out = subprocess.run([sys.executable, __file__, "--worker", VARIANTS[i], str(n), grad,
                                          str(a.repeat)], capture_output=True, text=True, env=env, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if VARIANTS[i] not in runs or r["time_s"] < runs[VARIANTS[i]]["time_s"]:
                        runs[VARIANTS[i]] = {**r, "peak_mib": max(r["peak_mib"], runs.get(VARIANTS[i], r)["peak_mib"])}
            base = runs.get(VARIANTS[0])
            print(f"\ngradient for {'W (head_ft)' if grad == 'w' else 'X (LoRA, attention methods)'}, N = {n}")
            print(f"| variant | step ms | vs linear+CE | peak MiB | vs linear+CE | maxdiff |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, r in runs.items():
                rt = r["time_s"] / base["time_s"] if base else float("nan")
                rm = r["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else float("nan")
                print(f"| {name} | {1e3 * r['time_s']:.1f} | {rt:.2f}x | {r['peak_mib']:.0f} | {rm:.2f}x | "
                      f"{r['maxdiff']:.1e} |")
                rows.append(r)
    if a.out:
        write_result(a.out, {"threads": int(os.environ.get("BENCH_THREADS", "2")), "repeat": a.repeat,
                             "rounds": a.rounds, "rows": rows})


if __name__ == "__main__":
    main()
