"""Backward Attention head against the base's own LM head, side by side in one run.

    python benchmarks/backward_head.py [--model smollm2-135m] [--tokens 256] [--decode-tokens 32]

Training: time and peak tensor memory of one step (loss + backward) from N final hidden states,
against plain LM-head cross-entropy F.cross_entropy(F.linear(h, W)) with W trainable (as head_ft
trains it), at the same N. Inference: time per token of head(h) -> log-probs against the LM head's
h W^T -> log_softmax. Decoding: tokens/s of model.generate with the KV cache, greedy, on the same
prompts with every output forced to the same length (min_new_tokens = max_new_tokens), the base
against the model with the head attached. The "const MiB" column is what the head keeps per base
(the normalised-embedding table, and for the residual form [W_out, b, R]): allocated once, like a
second LM head, and not counted in the per-step peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from memory import peak_bytes  # noqa: E402
from record import write_result  # noqa: E402

import attnlab  # noqa: E402
from attnlab.data import build_splits  # noqa: E402
from attnlab.data.tokenize import collate_prompts  # noqa: E402

VARIANTS = {
    "paper (d=E)": {"preset": "paper"},
    "paper, latent 64": {"preset": "paper", "latent_dim": 64, "attn_dim": 64},
    "residual (d=E)": {"preset": "residual", "latent_dim": None, "attn_dim": None},
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


def decode_tokens_per_s(model, batch, n_new, pad_id, repeat):
    def run():
        with torch.no_grad():
            model.generate(**batch, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                           pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    return batch["input_ids"].shape[0] * n_new / timeit(run, repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256, help="positions per training/inference call (N)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="prompts decoded together (batch)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens per prompt (0: skip decoding)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    torch.manual_seed(0)
    bb = attnlab.load_backbone(a.model)
    model, pad = bb.model, bb.tokenizer.pad_token_id
    lm = model.get_output_embeddings()
    V, E = lm.weight.shape
    h = torch.randn(a.tokens, E) * 2
    y = torch.randint(0, V, (a.tokens,))
    prompts = build_splits({"dataset_name": "arithmetic", "n_train": 1, "n_val": 0, "n_eval": a.prompts,
                            "max_length": 192}, bb.tokenizer).eval[: a.prompts]
    batch = collate_prompts(prompts, pad)

    def base_infer():
        with torch.no_grad():
            F.log_softmax(lm(h), -1)

    def base_train():
        w = lm.weight.detach().clone().requires_grad_(True)  # as head-only fine-tuning would
        F.cross_entropy(F.linear(h, w), y, reduction="sum").backward()

    t_inf, t_tr = timeit(base_infer, a.repeat), timeit(base_train, a.repeat)
    m_tr = peak_bytes(base_train)
    dec = decode_tokens_per_s(model, batch, a.decode_tokens, pad, 2) if a.decode_tokens else float("nan")
    rows = [{"variant": "base LM head", "infer_ms_per_tok": 1e3 * t_inf / a.tokens, "train_ms_per_step": 1e3 * t_tr,
             "train_peak_MiB": m_tr / 2**20, "decode_tok_per_s": dec, "const_MiB": 0.0}]
    for name, opts in VARIANTS.items():
        p = attnlab.attach(model, "backward_head", **opts)
        head = model.get_output_embeddings()
        with torch.no_grad():
            head(h[:1])  # the base's constants computed once, as at load
        const = head.constant_bytes()

        def infer():
            with torch.no_grad():
                head(h)

        def step():
            p.on_step_start()
            head.target_loss(h, y).backward()
            p.on_step_end()
            for q in p.trainable_parameters().values():
                q.grad = None

        ti, ts = timeit(infer, a.repeat), timeit(step, a.repeat)
        m = peak_bytes(step)
        d = decode_tokens_per_s(model, batch, a.decode_tokens, pad, 2) if a.decode_tokens else float("nan")
        rows.append({"variant": name, "infer_ms_per_tok": 1e3 * ti / a.tokens, "infer_x_base": ti / t_inf,
                     "train_ms_per_step": 1e3 * ts, "train_x_base": ts / t_tr, "train_peak_MiB": m / 2**20,
                     "train_mem_x_base": m / m_tr, "decode_tok_per_s": d, "decode_x_base": d / dec,
                     "const_MiB": const / 2**20})
        p.detach()
    print(f"model {a.model} (V = {V}, E = {E}), N = {a.tokens} positions, decoding {a.prompts} prompts x "
          f"{a.decode_tokens} tokens, {torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("| variant | train step ms | × base | train peak MiB | × base | inference ms/token | × base "
          "| decode tok/s | × base | const MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['train_ms_per_step']:.0f} | {r.get('train_x_base', 1):.2f} | "
              f"{r['train_peak_MiB']:.0f} | {r.get('train_mem_x_base', 1):.2f} | {r['infer_ms_per_tok']:.3f} | "
              f"{r.get('infer_x_base', 1):.2f} | {r['decode_tok_per_s']:.1f} | {r.get('decode_x_base', 1):.2f} | "
              f"{r['const_MiB']:.0f} |")
    if a.out:
        write_result(a.out, {"model": a.model, "tokens": a.tokens, "prompts": a.prompts,
                             "decode_tokens": a.decode_tokens, "rows": rows})


if __name__ == "__main__":
    main()
