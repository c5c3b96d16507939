"""Sparse attention v3 speed, one run side by side: the attention function, the model body, decoding.

    OMP_NUM_THREADS=1 python benchmarks/sparse_speed.py --lengths 4096 8192 \
        --decode-lengths 1024 2048 4096 8192

SmolLM2-135M's shape with random weights (timings do not depend on the weights; the learned gate is
the untrained, seeded one: its top_k chooses as many blocks as a trained one), CPU fp32, batch 1.
Density ~0.25 at every length: quest and learned with granularity block, top_k 6 over blocks of
64 tokens at 4096 and 128 at 8192 (blocks of bs*4096/T... i.e. the same number of blocks); the window
T/8 keys (+4 sinks). The density each row reports is the fraction of causal pairs kept.
  1. attention: the attention function alone (SparseLayer, selection included) on one layer's q, k, v
     of the random model at length T, forward (no grad) and forward + backward, timed interleaved
     (every variant once per round, `--repeat` rounds, median) in wall and process CPU seconds; beside
     each sparse variant its ideal: ONE dense SDPA call (non-causal, no mask) of the T queries
     against n = kept pairs / T keys, i.e. the same number of (query, key) pairs with no selection,
     gather or mask.
  2. body: `attnlab.profile.profile` on the first `--layers` layers (inference with attention_seconds,
     training step with peak memory), dense SDPA and the three variants.
  3. decode: `attnlab.profile.profile` mode decode on the whole 30-layer model: one generated token with
     a KV cache of each --decode-lengths context (dense SDPA, quest, learned).
Writes --out (JSON, the command inside) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.modules import attach  # noqa: E402
from attnlab.modules.attention import register  # noqa: E402
from attnlab.profile import build_model, profile  # noqa: E402

TOP_K = 6


def options(T: int) -> dict[str, dict]:
    bs = max(64, 64 * T // 4096)
    return {"window": dict(variant="window", window=T // 8, sinks=4, block_size=bs),
            "quest": dict(variant="quest", top_k=TOP_K, block_size=bs),
            "learned": dict(variant="learned", top_k=TOP_K, block_size=bs)}


def record_qkv(model, T: int):
    """q, k, v of the model's layer 0 at length T (random tokens)."""
    kept = {}

    def rec(module, q, k, v, mask, **kw):
        kept["qkv"] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2), None

    register({"sdpa": "attnlab_speed_record"}, rec)
    model.config._attn_implementation = "attnlab_speed_record"
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    model.config._attn_implementation = "sdpa"
    return kept["qkv"]


def timed(fn, backward: bool):
    def run():
        if backward:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()
    t, c = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - t, time.process_time() - c


def attention_rows(model, T: int, repeat: int) -> list[dict]:
    q0, k0, v0 = record_qkv(model, T)
    q, k, v = (x.requires_grad_(True) for x in (q0, k0, v0))
    scale = q.shape[-1] ** -0.5
    fns = {"dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    info = {"dense-sdpa": {"density": 1.0, "work": 1.0}}
    plugins = []
    for name, opts in options(T).items():
        plugin = attach(model, "sparse", **opts)
        plugins.append(plugin)
        layer = plugin.layers()[0]
        fns[name] = lambda layer=layer: layer(q, k, v, None, scale)
        with torch.no_grad():
            layer(q0, k0, v0, None, scale)
        density = 1 - float(layer.last_sparsity)
        info[name] = {"density": density, "work": layer.last_pairs_scored / (q.shape[1] * T * (T + 1) / 2),
                      "options": opts}
        n = max(1, round(density * (T + 1) / 2))                # kept pairs per row, on average
        fns[f"ideal ({name})"] = lambda n=n: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=scale,
                                                                            enable_gqa=True)
        info[f"ideal ({name})"] = {"density": density, "work": density, "keys": n}
        plugin.detach()   # the layer object keeps working on its own; the model goes back to dense
    rows = []
    for backward in (False, True):
        times = {name: [] for name in fns}
        for fn in fns.values():
            timed(fn, backward)                                 # warm-up
        for _ in range(repeat):
            for name, fn in fns.items():
                times[name].append(timed(fn, backward))
        for name in fns:
            row = {"part": "attention", "tokens": T, "variant": name, "mode": "training" if backward else "inference",
                   "wall_s": statistics.median(t for t, _ in times[name]),
                   "cpu_s": statistics.median(c for _, c in times[name]), **info[name]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def spec(name: str, opts: dict) -> str:
    return opts["variant"] + ":" + ",".join(f"{k}={v}" for k, v in opts.items() if k != "variant")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--layers", type=int, default=2, help="body layers for part 2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["attention", "body", "decode"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_speed.json"))
    args = ap.parse_args(argv)
    started = time.time()
    meta = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), "python"] + sys.argv),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_before": os.getloadavg()}
    rows = []
    if "attention" in args.parts:
        model = build_model("smollm2-135m", random_weights=True, layers=1)
        for T in args.lengths:
            rows += attention_rows(model, T, args.repeat)
    if "body" in args.parts:
        model = build_model("smollm2-135m", random_weights=True, layers=args.layers)
        for T in args.lengths:
            variants = ["dense-sdpa"] + [spec(n, o) for n, o in options(T).items()]
            for r in profile(model, variants, [T], ("inference", "training"), repeat=args.repeat):
                rows.append({"part": "body", "layers": args.layers, **r})
    if "decode" in args.parts and args.decode_lengths:
        model = build_model("smollm2-135m", random_weights=True)
        for T in args.decode_lengths:
            opts = options(T)
            variants = ["dense-sdpa", spec("quest", opts["quest"]), spec("learned", opts["learned"])]
            for r in profile(model, variants, [T], ("decode",), repeat=args.repeat):
                rows.append({"part": "decode", "layers": model.config.num_hidden_layers, **r})
    meta.update(seconds=time.time() - started, load_after=os.getloadavg())
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
