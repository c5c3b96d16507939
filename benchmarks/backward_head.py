"""Backward Attention head against the base's own LM head, side by side in one run.

    python benchmarks/backward_head.py [--model smollm2-135m] [--tokens 256]

Inference: time per token of head(h) -> log-probs (tables precomputed at load) against the base's
LM head (h W^T -> log-probs), for the `paper` preset (d = hidden size) and the presets used in the
experiment. Training: time and peak tensor memory of one step (loss + backward) against plain
LM-head cross-entropy at the same batch; the head's step includes its per-step tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from memory import peak_bytes  # noqa: E402

import attnlab  # noqa: E402

VARIANTS = {
    "paper (d=E)": {"preset": "paper"},
    "paper, latent 64": {"preset": "paper", "latent_dim": 64, "attn_dim": 64},
    "residual, latent 64": {"preset": "residual"},
}


def timeit(fn, repeat=5):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256, help="positions per call (N)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    torch.manual_seed(0)
    bb = attnlab.load_backbone(a.model)
    lm = bb.model.get_output_embeddings()
    E = lm.weight.shape[1]
    h = torch.randn(a.tokens, E) * 2
    y = torch.randint(0, lm.weight.shape[0], (a.tokens,))
    rows = []

    def base_infer():
        with torch.no_grad():
            F.log_softmax(lm(h), -1)

    def base_train():
        w = lm.weight.detach().clone().requires_grad_(True)  # as head-only fine-tuning would
        F.cross_entropy(F.linear(h, w), y, reduction="sum").backward()

    t_inf, t_tr = timeit(base_infer, a.repeat), timeit(base_train, a.repeat)
    m_tr = peak_bytes(base_train)
    rows.append({"variant": "base LM head", "infer_ms_per_tok": 1e3 * t_inf / a.tokens,
                 "train_ms_per_step": 1e3 * t_tr, "train_peak_MiB": m_tr / 2**20})
    for name, opts in VARIANTS.items():
        p = attnlab.attach(bb.model, "backward_head", **opts)
        head = bb.model.get_output_embeddings()
        with torch.no_grad():
            head(h[:1])  # tables computed once, as at load

        def infer():
            with torch.no_grad():
                head(h)

        def step():
            p.on_step_start()
            head.target_loss(h, y).backward()
            p.on_step_end()
            for q in p.trainable_parameters().values():
                q.grad = None

        ti, ts = timeit(infer, a.repeat), timeit(step, max(2, a.repeat // 2))
        rows.append({"variant": name, "infer_ms_per_tok": 1e3 * ti / a.tokens, "infer_x_base": ti / t_inf,
                     "train_ms_per_step": 1e3 * ts, "train_x_base": ts / t_tr,
                     "train_peak_MiB": peak_bytes(step) / 2**20, "train_mem_x_base": peak_bytes(step) / m_tr})
        p.detach()
    print(f"model {a.model}, N = {a.tokens} positions, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("| variant | inference ms/token | × base | train step ms | × base | train peak MiB | × base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['infer_ms_per_tok']:.3f} | {r.get('infer_x_base', 1):.2f} | "
              f"{r['train_ms_per_step']:.0f} | {r.get('train_x_base', 1):.2f} | {r['train_peak_MiB']:.0f} | "
              f"{r.get('train_mem_x_base', 1):.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
