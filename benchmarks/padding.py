"""One training step of 8 GSM8K problems: one padded micro-batch of 8 against 8 micro-batches of one.

    OMP_NUM_THREADS=1 python benchmarks/padding.py --method factorized --steps 2

Both compute the same step (the trainer normalises the loss by the step's target tokens, so the
gradients are equal up to float rounding); the padded batch runs every problem at the length of the
longest one (GSM8K in the chat template: 183 tokens on average, batches of 8 in data order pad
to ~1.47x their real tokens). Reports CPU seconds (this process's, so other jobs on the machine
count less) per step for each, interleaved, on consecutive groups of 8 training problems of
configs/factorized_attention.yaml. Why that config trains with batch_size 1 x grad_accum 8.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402
from attnlab.data import build_splits, collate  # noqa: E402

OPTIONS = {"lora": {"r": 8, "alpha": 16},
           "factorized": {"factor_dim": 128, "lora_r": 8, "lora_alpha": 16, "placement": "pre_rope"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=list(OPTIONS), default="factorized")
    ap.add_argument("--steps", type=int, default=2, help="groups of 8 problems, each timed both ways")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "configs" / "factorized_attention.yaml").read_text())
    bb = attnlab.load_backbone(cfg["model"])
    train = build_splits(cfg["data"], bb.tokenizer).train
    attnlab.attach(bb.model, args.method, **OPTIONS[args.method])
    pad = bb.tokenizer.pad_token_id

    def step(chunks) -> float:
        start = time.process_time()
        for c in chunks:
            b = collate(c, pad)
            bb.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        return time.process_time() - start

    rows = []
    for s in range(args.steps):
        group = train[8 * s: 8 * s + 8]
        real = sum(len(e.input_ids) for e in group)
        padded = 8 * max(len(e.input_ids) for e in group)
        rows.append((padded / real, step([group]), step([[e] for e in group])))
        print(f"step {s}: padded/real tokens {rows[-1][0]:.2f}, batch of 8 {rows[-1][1]:.1f} s, "
              f"8 x 1 {rows[-1][2]:.1f} s, ratio {rows[-1][1] / rows[-1][2]:.2f}", flush=True)
    print(f"{args.method}, {torch.get_num_threads()} thread(s): batch of 8 / 8 x 1 = "
          f"{sum(r[1] for r in rows) / sum(r[2] for r in rows):.2f} over {len(rows)} steps")


if __name__ == "__main__":
    main()
