"""Bytes the Backward Attention head keeps per base (its constants), at a real model's shape, on
random weights.

    python benchmarks/backward_head_constants.py [--vocab 128256] [--hidden 4096] [--dtypes bf16 fp32]
    python benchmarks/backward_head_constants.py --render     # the README table from the results file

The head keeps R = diag(r) IE (V x E) and C = W_out^T R (E x E), plus c and s (E each); the residual
form scores against [W_out, b, R] as column blocks, the base's own LM head included by reference (a
zero bias column when the head has none). They are computed from the base's embedding and LM head
in the base's dtype, so a bf16 base (the default on a GPU) halves them. The count is exact: the
bytes of every storage `constants()` holds that is not the base's own, each once (`constant_bytes`),
on CPU. Default shape: Llama-3 8B (V = 128,256, E = 4,096, untied head). Peak host memory of the
fp32 case is ~7 GB (embedding, head and R).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnlab.atomic import write_json_atomic  # noqa: E402
from attnlab.modules.backward_head import PRESETS, BackwardAttentionHead, BackwardHeadConfig  # noqa: E402
from attnlab.precision import DTYPES  # noqa: E402


def measure(vocab: int, hidden: int, dtype: torch.dtype, presets: list[str]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    emb = torch.empty(vocab, hidden, dtype=dtype).normal_(0, 0.02, generator=g)       # no fp32 temporary
    head = nn.Linear(1, 1, bias=False).requires_grad_(False)
    head.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype).normal_(0, 0.02, generator=g),
                               requires_grad=False)
    base = emb.numel() * emb.element_size()
    rows = []
    for preset in presets:
        t = time.perf_counter()
        h = BackwardAttentionHead(BackwardHeadConfig(**PRESETS[preset]), emb, head)
        n = h.constant_bytes()
        rows.append({"preset": preset, "dtype": str(dtype).replace("torch.", ""), "vocab": vocab, "hidden": hidden,
                     "constant_bytes": n, "constant_GiB": round(n / 2**30, 3),
                     "x_embedding": round(n / base, 3), "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del h
    return rows


def markdown(result: dict) -> str:
    """The README's table, from the results file."""
    lines = ["| preset | base dtype | constants | × the embedding table |", "|---|---|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['preset']} | {r['dtype']} | {r['constant_bytes'] / 2**30:.2f} GiB | {r['x_embedding']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--presets", nargs="+", default=["paper", "residual"], choices=sorted(PRESETS))
    ap.add_argument("--out", default="benchmarks/results/backward_head_constants.json")
    ap.add_argument("--render", action="store_true", help="print the markdown table of --out; measure nothing")
    a = ap.parse_args()
    if a.render:
        print(markdown(json.loads(Path(a.out).read_text())))
        return
    torch.set_grad_enabled(False)
    rows = [r for d in a.dtypes for r in measure(a.vocab, a.hidden, DTYPES[d], a.presets)]
    write_json_atomic(Path(a.out), {
        "command": "python " + " ".join(sys.argv), "what": "bytes of BackwardAttentionHead.constants() "
        "(each storage once), random weights, CPU", "torch": torch.__version__,
        "python": platform.python_version(), "rows": rows})
    print(f"wrote {a.out}")
    print(markdown(json.loads(Path(a.out).read_text())))


if __name__ == "__main__":
    main()
