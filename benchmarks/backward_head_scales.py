"""The scales of the base that the literal Backward Attention head has to reproduce (docs/backward_head.md).

    python benchmarks/backward_head_scales.py --out benchmarks/results/backward_head_scales.json

* the per-row factor r_v = 1 / RMS(IE_v) of the (tied) token embedding, exactly as the head computes
  it (`_row_rms_inverse`): the `paper` head RMS-normalises its rows, so it reproduces the base only
  up to this per-row scale; its spread says how far the u = h start is from the base;
* the base's final hidden states h (what the LM head reads) at the target positions of the first 64
  GSM8K training problems (the slice the fitted start uses): the mean over positions of RMS(h), and
  the largest |h_e|. tanh(W_k h) is bounded in [−1, 1], h is not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnlab  # noqa: E402
from attnlab.atomic import write_json_atomic  # noqa: E402
from attnlab.data import build_splits  # noqa: E402
from attnlab.evaluate import base_reference  # noqa: E402
from attnlab.modules.backward_head import _row_rms_inverse  # noqa: E402
from backward_head_init import GSM8K  # noqa: E402  (the same slices as the init benchmark)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    t0 = time.time()
    bb = attnlab.load_backbone(a.model)
    r = _row_rms_inverse(bb.model.get_input_embeddings().weight).double().squeeze(-1)
    splits = build_splits(GSM8K, bb.tokenizer)
    h = base_reference(bb.model, splits.train[:a.problems], bb.tokenizer.pad_token_id, 16).hidden.double()
    out = {"command": " ".join(["python benchmarks/backward_head_scales.py", *(sys.argv[1:] if argv is None else argv)]),
           "model": a.model, "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1),
           "embedding_row_rms_inverse": {"min": r.min().item(), "mean": r.mean().item(), "max": r.max().item(),
                                 "rows": r.numel()},
           "hidden": {"problems": a.problems, "positions": h.shape[0], "rms_mean": h.pow(2).mean(-1).sqrt().mean().item(),
                      "abs_max": h.abs().max().item()}}
    write_json_atomic(a.out, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
