"""The frozen base's greedy answer accuracy on the generator, per level and family split.

    OMP_NUM_THREADS=1 python benchmarks/arithmetic_levels.py --n 32 --out docs/results/arithmetic_levels.json
                                                            # docs/arithmetic.md's table

Problems come from the test split (by hash) of each (families, level) stream, so they are the
kind of problem a run's test and transfer sets hold. Accuracy counts an answer only from a
finished generation or an explicit marker (attnlab.evaluate.answer_metrics); the interval is a
95% Wilson interval.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from record import write_result  # noqa: E402  (imported first: it notes the start time and load)

import torch  # noqa: E402

from attnlab import load_backbone  # noqa: E402
from attnlab.data import build_splits  # noqa: E402
from attnlab.evaluate import answer_metrics, generate  # noqa: E402
from attnlab.stats import wilson_interval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="problems per (families, level)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--out", help="also write the rows (with the command and conditions) as JSON here")
    a = ap.parse_args()
    bb = load_backbone(a.model)
    rows = []
    print(f"# {a.model}, greedy, max_new_tokens {a.max_new_tokens}, {torch.get_num_threads()} threads")
    print("| families | level | right | accuracy | 95% interval | answered | cut off |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for families in ("train", "transfer"):
        for level in (1, 2, 3, 4, 5):
            t = time.perf_counter()
            s = build_splits({"dataset_name": "arithmetic", "families": families, "level": level, "n_train": 0,
                              "n_val": 0, "n_eval": a.n, "max_length": 512}, bb.tokenizer)
            st = {}
            texts = generate(bb.model, bb.tokenizer, s.eval, a.max_new_tokens, a.batch_size, stats=st)
            m = answer_metrics(texts, [e.answer for e in s.eval], finished=st["finished"])
            k, n = sum(m["per_example"]["correct"]), len(m["per_example"]["correct"])
            lo, hi = wilson_interval(k, n)
            rows.append({"families": families, "level": level, "right": k, "n": n, "accuracy": k / n,
                         "lo": lo, "hi": hi, "answered": m["n_answered"], "cut_off": st["n_cut_off"],
                         "seconds": round(time.perf_counter() - t, 1)})
            print(f"| {families} | {level} | {k}/{n} | {k / n:.3f} | [{lo:.3f}, {hi:.3f}] | {m['n_answered']} | "
                  f"{st['n_cut_off']} |", flush=True)
    if a.out:
        write_result(a.out, {"model": a.model, "n": a.n, "max_new_tokens": a.max_new_tokens, "decoding": "greedy",
                             "rows": rows})


if __name__ == "__main__":
    main()
