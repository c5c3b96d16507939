"""The attention function alone: dense SDPA against the sparse gather kernel, on real q, k, v.

    python benchmarks/sparse_kernel.py --lengths 1024 2048 4096 --layers 2 15 28

q, k, v are recorded from SmolLM2-135M (embedded) reading WikiText-2 (the first tokens of
../shared/data/wikitext-2/valid.txt) at the given layers, so Quest's and the window's selections are
those of real text. The learned gate's rows are added where a gate distilled by
benchmarks/sparse_quality.py at that length is on disk (runs/sparse_quality_<T>/gate.safetensors, or
--gate): its selections are then those of the trained gate on the same text. For each length, layer
and variant, forward only
(inference) and forward + backward, timed interleaved (dense, then each variant, repeated) so that
load from other processes hits all alike; reported: medians of wall time and of this process's CPU
time, and the pairs scored. The CPU time is the steadier number on a shared machine.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402
from attnlab.modules.attention import register  # noqa: E402
from attnlab.modules.sparse import blocksparse  # noqa: E402
from attnlab.modules.sparse.blocksparse import block_sparse_attention  # noqa: E402
from attnlab.modules.sparse.patterns import Pattern  # noqa: E402
from attnlab.modules.sparse.quest import quest_scores  # noqa: E402

# name -> (quest top_k or None for the window, query positions per tile for per-row selections)
VARIANTS = {"window 256 + 4 sinks": (None, 16), "quest top-4": (4, 16), "quest top-2": (2, 16),
            "quest top-2, 64-row tiles": (2, 64)}


def record(length: int, layers: list[int]):
    bb = attnlab.load_backbone("smollm2-135m")
    text = (ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt").read_text()
    ids = torch.tensor(bb.tokenizer(text[:length * 8], add_special_tokens=False)["input_ids"][:length])[None]
    kept = {}

    def rec(module, q, k, v, mask, **kw):
        if module.layer_idx in layers:
            kept[module.layer_idx] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2), None

    register({"sdpa": "attnlab_record"}, rec)
    bb.model.config._attn_implementation = "attnlab_record"
    with torch.no_grad():
        bb.model(input_ids=ids, use_cache=False)
    bb.model.config._attn_implementation = "sdpa"
    return kept, bb.model


def trained_gates(model, path: Path | None):
    """{layer index: SparseLayer} with the distilled gate loaded, or None when there is no file."""
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file
    state = load_file(str(path))
    dim = next(v for k, v in state.items() if k.endswith("wq")).shape[-1]
    plugin = attnlab.attach(model, "sparse", variant="learned", block_size=64, gate_dim=int(dim))
    plugin.load_state_dict(state)
    return {layer.layer_idx: layer for layer in plugin.layers()}


def timed(fn, backward: bool):
    def run():
        if backward:
            out = fn()
            out.sum().backward()
        else:
            with torch.no_grad():
                fn()
    t, c = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gate", default=None, help="a distilled gate (safetensors; default "
                    "runs/sparse_quality_<T>/gate.safetensors where it exists)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_kernel.json"))
    args = ap.parse_args(argv)
    rows = []
    for T in args.lengths:
        recorded, model = record(T, args.layers)
        gates = trained_gates(model, Path(args.gate) if args.gate else ROOT / "runs" / f"sparse_quality_{T}" / "gate.safetensors")
        variants = dict(VARIANTS)
        if gates is not None:
            variants.update({"learned top-2 (distilled gate)": ("gate", 2), "learned top-4 (distilled gate)": ("gate", 4)})
        for layer, (q0, k0, v0) in recorded.items():
            q, k, v = (x.requires_grad_(True) for x in (q0, k0, v0))
            scale = q.shape[-1] ** -0.5

            def sel(topk):
                if isinstance(topk, tuple):                   # ("gate", k): the distilled gate's top-k,
                    p = Pattern(T, T, 64, "cpu")              # per row of each kv head
                    with torch.no_grad():
                        scores = gates[layer].gate_scores(q.detach(), k.detach(), p)[:, :, None]
                    return p, p.row_selection(scores, top_k=topk[1])
                if topk is None:
                    p = Pattern(T, T, 64, "cpu", 256, 4)
                    return p, p.window_selection()
                p = Pattern(T, T, 64, "cpu")
                return p, p.row_selection(quest_scores(q.detach(), k.detach(), p), top_k=topk)

            fns = {"dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                         enable_gqa=True).transpose(1, 2).contiguous()}
            work = {"dense-sdpa": 1.0}
            def run(topk, tile, q=q, k=k, v=v):
                blocksparse.ROW_TILE = tile
                return block_sparse_attention(q, k, v, *sel(topk), None, scale)

            for name, (topk, tile) in variants.items():
                if topk == "gate":
                    topk, tile = (topk, tile), 16             # the gate's top-k, 16-row tiles
                # the selection is part of the cost (Quest's bound, top-k), as in the model
                fns[name] = (lambda topk=topk, tile=tile: run(topk, tile)[0])
                p, s = sel(topk)
                _, pairs = run(topk, tile, q.detach(), k.detach(), v.detach())
                work[name] = pairs / (q.shape[1] * T * (T + 1) / 2)
                kept, total = p.pair_counts(s)
                work[name + " density"] = float(kept / total)
            for backward in (False, True):
                times = {name: [] for name in fns}
                for name, fn in fns.items():          # warm-up
                    timed(fn, backward)
                for _ in range(args.repeat):
                    for name, fn in fns.items():
                        times[name].append(timed(fn, backward))
                for name in fns:
                    wall = statistics.median(t for t, _ in times[name])
                    cpu = statistics.median(c for _, c in times[name])
                    row = {"tokens": T, "layer": layer, "variant": name, "mode": "training" if backward else "inference",
                           "wall_s": wall, "cpu_s": cpu, "work": work[name], "density": work.get(name + " density", 1.0)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print("\n| tokens | mode | variant | density | work | wall × SDPA | CPU × SDPA |")
    print("|---:|---|---|---:|---:|---:|---:|")
    keys = sorted({(r["tokens"], r["mode"], r["variant"]) for r in rows}, key=lambda x: (x[0], x[1], x[2] != "dense-sdpa"))
    for T, mode, name in keys:
        sel_rows = [r for r in rows if (r["tokens"], r["mode"], r["variant"]) == (T, mode, name)]
        ref = [r for r in rows if (r["tokens"], r["mode"], r["variant"]) == (T, mode, "dense-sdpa")]
        wall = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(sel_rows, ref))
        cpu = statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(sel_rows, ref))
        dens = statistics.mean(r["density"] for r in sel_rows)
        wk = statistics.mean(r["work"] for r in sel_rows)
        print(f"| {T} | {mode} | {name} | {dens:.2f} | {wk:.2f} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
