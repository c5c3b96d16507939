"""What subnormal floats cost on this CPU: a fp32 matmul of normal numbers against the same matmul whose
left operand is subnormal (|x| < 1.2e-38), with and without torch.set_flush_denormal (attnlab/precision.py).

    OMP_NUM_THREADS=1 python benchmarks/subnormal_cost.py --out benchmarks/results/subnormal_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def seconds(a: torch.Tensor, b: torch.Tensor, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    b = torch.randn(args.n, args.n, generator=g)
    normal = torch.randn(args.n, args.n, generator=g)
    sub = torch.rand(args.n, args.n, generator=g) * 1e-40
    assert (sub.abs() < torch.finfo(torch.float32).tiny).all() and (sub != 0).any()
    out = {"command": " ".join(["benchmarks/subnormal_cost.py"] + sys.argv[1:]), "n": args.n,
           "threads": torch.get_num_threads()}
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        r = {"normal_s": seconds(normal, b, args.repeat), "subnormal_s": seconds(sub, b, args.repeat)}
        out["flush" if flush else "no_flush"] = {**r, "ratio": r["subnormal_s"] / r["normal_s"]}
    torch.set_flush_denormal(False)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
