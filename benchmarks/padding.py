"""One training step of 8 GSM8K problems: one padded micro-batch of 8 against 8 micro-batches of one.

    OMP_NUM_THREADS=1 python benchmarks/padding.py --method factorized --steps 4

The trainer's loss (attnlab.train.TargetLoss: the LM head on target positions only), forward and
backward. In the trainer both compute the same step (it normalises the loss by the step's target
tokens, so the gradients are equal up to float rounding); the padded batch runs every problem at
the length of the longest one (GSM8K in the chat template: 183 tokens on average, batches of 8 in
data order pad to ~1.47x their real tokens). One untimed warm-up step each way, then, on
consecutive groups of 8 training problems of configs/factorized_attention.yaml, both ways in
alternating order; CPU seconds of this process (so other jobs on the machine count less). Why that
config trains with batch_size 1 x grad_accum 8.
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
from attnlab.train import TargetLoss  # noqa: E402

ARMS = {"lora": "lora", "factorized": "fa_pre"}    # --method: the config's arm whose options are used


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=list(ARMS), default="factorized")
    ap.add_argument("--steps", type=int, default=2, help="groups of 8 problems, each timed both ways")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "configs" / "factorized_attention.yaml").read_text())
    bb = attnlab.load_backbone(cfg["model"])
    train = build_splits(cfg["data"], bb.tokenizer).train
    arm = next(m for m in cfg["methods"] if m["name"] == ARMS[args.method])
    attnlab.attach(bb.model, arm["method"], **{k: v for k, v in arm.items() if k not in ("name", "method", "train")})
    pad = bb.tokenizer.pad_token_id
    loss = TargetLoss(bb.model)

    def step(chunks) -> float:
        start = time.process_time()
        for c in chunks:
            loss(**collate(c, pad)).backward()
        return time.process_time() - start

    step([train[:8]]), step([[e] for e in train[:8]])                 # warm-up, untimed
    rows = []
    for s in range(args.steps):
        group = train[8 * (s + 1): 8 * (s + 2)]
        real = sum(len(e.input_ids) for e in group)
        padded = 8 * max(len(e.input_ids) for e in group)
        if s % 2:
            one, batched = step([[e] for e in group]), step([group])
        else:
            batched, one = step([group]), step([[e] for e in group])
        rows.append((padded / real, batched, one))
        print(f"step {s}: padded/real tokens {rows[-1][0]:.2f}, batch of 8 {rows[-1][1]:.1f} s, "
              f"8 x 1 {rows[-1][2]:.1f} s, ratio {rows[-1][1] / rows[-1][2]:.2f}", flush=True)
    print(f"{args.method}, {torch.get_num_threads()} thread(s): batch of 8 / 8 x 1 = "
          f"{sum(r[1] for r in rows) / sum(r[2] for r in rows):.2f} over {len(rows)} steps")


if __name__ == "__main__":
    main()
