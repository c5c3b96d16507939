"""Sparse attention v3 speed, one run side by side: the attention function, the model body, decoding.

    OMP_NUM_THREADS=1 python benchmarks/sparse_speed.py --lengths 4096 8192 \
        --decode-lengths 1024 2048 4096 8192

SmolLM2-135M's shape with random weights (timings do not depend on the weights; the learned gate is
the untrained, seeded one: its top_k chooses as many blocks as a trained one), CPU fp32, batch 1.
Density ~0.25 at every length: quest and learned with granularity block, top_k 6 over blocks of
64 tokens at 4096 and 128 at 8192 (the same number of blocks); the window T/8 keys (+4 sinks). The density each row reports is the fraction of causal pairs kept.
  1. attention: the attention function alone (SparseLayer, selection included) on one layer's q, k, v
     of the random model at length T, forward (no grad) and forward + backward, timed interleaved
     (every variant once per round, `--repeat` rounds, median) in wall and process CPU seconds; beside
     each sparse variant its ideal: ONE dense SDPA call (non-causal, no mask) of the T queries
     against n = kept pairs / T keys, i.e. the same number of (query, key) pairs with no selection,
     gather or mask.
  2. body: the training step (forward + backward) of the first `--layers` layers, as `attnlab profile`
     times it, interleaved like 1 (wall and CPU), and its peak memory (attnlab.memory).
  3. decode: one generated token of the whole 30-layer model with a KV cache of each --decode-lengths
     context, as `attnlab profile --modes decode` times it, interleaved (dense SDPA, quest, learned).
The machine is shared: the CPU seconds of this process are the steadier number; `load` in the meta.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from attnlab.modules import attach  # noqa: E402
from attnlab.modules.attention import register  # noqa: E402
from attnlab.modules.sparse.lowrank import calibrate_for_timing  # noqa: E402
from attnlab.profile import build_model  # noqa: E402
from sparse_kernel import timed  # noqa: E402

TOP_K = 6


VARIANTS = ("window", "quest", "learned")    # the default: the committed runs' (lowrank: --variants)


def options(T: int, variants=VARIANTS) -> dict[str, dict]:
    bs = max(64, 64 * T // 4096)
    every = {"window": dict(variant="window", window=T // 8, sinks=4, block_size=bs),
             "quest": dict(variant="quest", top_k=TOP_K, block_size=bs),
             "learned": dict(variant="learned", top_k=TOP_K, block_size=bs, gate_dim=32),   # as committed
             "lowrank": dict(variant="lowrank", top_k=TOP_K, block_size=bs, rank=16)}
    return {name: every[name] for name in variants}


_FITTED: dict[tuple, dict] = {}


def fit(model, plugin) -> None:
    """A lowrank plug-in's indexer fitted on one random sequence of 512 tokens of the random model (its
    cost does not depend on the fit; an unfitted indexer refuses to select), once per model and rank."""
    if plugin.config.variant != "lowrank":
        return
    key = (id(model), plugin.config.rank, tuple(plugin.config.layers or ()))
    if key not in _FITTED:
        calibrate_for_timing(model, plugin)
        _FITTED[key] = plugin.state_dict()
    plugin.load_state_dict(_FITTED[key])


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


def attention_rows(model, T: int, repeat: int, variants=VARIANTS) -> list[dict]:
    q0, k0, v0 = record_qkv(model, T)
    q, k, v = (x.requires_grad_(True) for x in (q0, k0, v0))
    scale = q.shape[-1] ** -0.5
    fns = {"dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    info = {"dense-sdpa": {"density": 1.0, "work": 1.0}}
    for name, opts in options(T, variants).items():
        plugin = attach(model, "sparse", **opts)
        fit(model, plugin)
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


def flex_rows(model, T: int, repeat: int) -> list[dict]:
    """Inference only (FlexAttention has no CPU backward): the quest layer with kernel flex (compiled
    once; the compile is the warm-up) against the same selection on the gather kernel and dense SDPA."""
    q, k, v = record_qkv(model, T)
    scale = q.shape[-1] ** -0.5
    fns = {"dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    for kernel in ("flex", "gather"):
        plugin = attach(model, "sparse", **options(T)["quest"], kernel=kernel)
        fns[f"quest ({kernel})"] = lambda layer=plugin.layers()[0]: layer(q, k, v, None, scale)
        plugin.detach()
    start = time.time()
    with torch.no_grad():
        fns["quest (flex)"]()
    compile_s = time.time() - start
    rows = []
    with torch.no_grad():
        timings = interleaved(fns, repeat)
    for name, (wall, cpu) in timings.items():
        row = {"part": "flex", "tokens": T, "variant": name, "mode": "inference", "wall_s": wall, "cpu_s": cpu,
               **({"first_call_s": compile_s} if name == "quest (flex)" else {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def interleaved(fns: dict, repeat: int, setup=None) -> dict[str, tuple[float, float]]:
    """name -> (median wall s, median CPU s) over `repeat` rounds, every fn once per round in turn;
    setup(name) -> a context manager entered around each call and its untimed warm-up."""
    import contextlib
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            with (setup(name) if setup else contextlib.nullcontext()):
                fn()                                            # warm-up (pages, first-call costs)
                t, c = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - t, time.process_time() - c))
    return {name: (statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)) for name, ts in times.items()}


def attached(model, opts_by_name: dict):
    """setup for interleaved(): the named variant's plug-in attached around the call (dense: none)."""
    import contextlib

    @contextlib.contextmanager
    def setup(name):
        plugin = attach(model, "sparse", **opts_by_name[name]) if opts_by_name.get(name) else None
        if plugin is not None:
            fit(model, plugin)
        try:
            yield plugin
        finally:
            if plugin is not None:
                plugin.detach()
    return setup


def body_rows(model, T: int, repeat: int) -> list[dict]:
    """Training step of the body (forward + backward through every layer's attention): time and peak."""
    from attnlab.memory import peak_bytes
    body, emb = model.model, model.get_input_embeddings()
    ids = torch.randint(0, emb.weight.shape[0], (1, T), generator=torch.Generator().manual_seed(T))

    def step():
        x = emb(ids).detach().requires_grad_(True)
        body(inputs_embeds=x, use_cache=False).last_hidden_state.float().pow(2).mean().backward()

    opts = {"dense-sdpa": None, **options(T)}
    setup = attached(model, opts)
    timings = interleaved({name: step for name in opts}, repeat, setup)
    rows = []
    for name in opts:
        with setup(name):
            peak = peak_bytes(step) / 2**20
        row = {"part": "body", "tokens": T, "layers": model.config.num_hidden_layers, "variant": name,
               "mode": "training", "wall_s": timings[name][0], "cpu_s": timings[name][1], "peak_MiB": peak}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_rows(model, T: int, repeat: int, chosen=VARIANTS) -> list[dict]:
    """One generated token of the whole model with a KV cache of T tokens (prefilled once, by dense
    SDPA: the cache's contents do not change the timing; each plug-in builds its page store in its
    untimed warm-up step), cropped back after each step. Each variant with both caches:
    transformers' DynamicCache (appends with torch.cat: copies the layer's K and V every token) and
    attnlab.kvcache.GrowingCache (appends in place; what generation uses with a sparse plug-in);
    the ideal: the dense model with a GrowingCache of as many tokens as a sparse step attends to."""
    from attnlab.kvcache import GrowingCache
    from attnlab.profile import _prefilled
    ids = torch.randint(0, model.config.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(T))
    dynamic = _prefilled(model, ids[:, :T])
    bs = options(T)["quest"]["block_size"]
    kept = (TOP_K + 2) * bs + ((T + 1) % bs or bs)   # blocks 0, i-1, the top_k and the diagonal's T+1-i*bs keys

    def growing(n):
        cache = GrowingCache()
        for i, layer in enumerate(dynamic.layers):
            cache.update(layer.keys[:, :, :n], layer.values[:, :, :n], i)
        return cache

    caches = {"dynamic": dynamic, "growing": growing(T), "ideal": growing(kept - 1)}
    variants = {"dense-sdpa": (None, "dynamic"), "dense-sdpa (growing cache)": (None, "growing"),
                f"ideal (dense, {kept} keys)": (None, "ideal")}
    every = options(T, [*VARIANTS, "lowrank"])
    for name in [v for v in ("quest", "learned", "lowrank") if v in chosen]:
        variants[name] = (every[name], "growing")
        variants[f"{name} (dynamic cache)"] = (every[name], "dynamic")

    def step(cache):
        with torch.no_grad():
            model(input_ids=ids[:, T:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)

    fns = {name: (lambda c=caches[kind]: step(c)) for name, (_, kind) in variants.items()}
    timings = interleaved(fns, repeat, attached(model, {name: o for name, (o, _) in variants.items()}))
    rows = []
    for name, (opts, kind) in variants.items():
        row = {"part": "decode", "tokens": T, "layers": model.config.num_hidden_layers, "variant": name,
               "mode": "decode", "cache": "growing" if kind == "ideal" else kind, "wall_s": timings[name][0],
               "cpu_s": timings[name][1], "tokens_per_s_cpu": 1 / timings[name][1], "options": opts,
               **({"keys": kept} if kind == "ideal" else {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def tables(rows: list[dict], parts: list[str] | None = None) -> str:
    """Markdown tables of the rows (of `parts` only, when given): ratios of CPU seconds (wall in
    brackets) to dense SDPA and to the variant's ideal, measured in the same run."""
    rows = [r for r in rows if parts is None or r["part"] in parts]
    def ref(r, name):
        return next(x for x in rows if x["part"] == r["part"] and x["tokens"] == r["tokens"]
                    and x["mode"] == r["mode"] and x["variant"] == name)

    out = ["| tokens | mode | variant | density | work | × SDPA (CPU) | × SDPA (wall) | × ideal (CPU) |",
           "|---:|---|---|---:|---:|---:|---:|---:|"] if any(x["part"] == "attention" for x in rows) else []
    for r in (x for x in rows if x["part"] == "attention" and not x["variant"].startswith("ideal")):
        d = ref(r, "dense-sdpa")
        ideal = f"{r['cpu_s'] / ref(r, 'ideal (' + r['variant'] + ')')['cpu_s']:.2f}" if r["variant"] != "dense-sdpa" else "–"
        out.append(f"| {r['tokens']} | {r['mode']} | {r['variant']} | {r['density']:.2f} | {r['work']:.2f} | "
                   f"{r['cpu_s'] / d['cpu_s']:.2f} | {r['wall_s'] / d['wall_s']:.2f} | {ideal} |")
    for r in (x for x in rows if x["part"] == "attention" and x["variant"].startswith("ideal")):
        d = ref(r, "dense-sdpa")
        out.append(f"| {r['tokens']} | {r['mode']} | {r['variant']} | {r['density']:.2f} | {r['work']:.2f} | "
                   f"{r['cpu_s'] / d['cpu_s']:.2f} | {r['wall_s'] / d['wall_s']:.2f} | 1 |")
    def section(part, header, cells):
        chosen = [x for x in rows if x["part"] == part]
        if chosen:
            out.extend(([""] if out else []) + ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)])
            out.extend("| " + " | ".join(cells(r, ref(r, "dense-sdpa"))) + " |" for r in chosen)

    section("flex", ["tokens", "variant", "× SDPA (CPU)", "× SDPA (wall)"],
            lambda r, d: [str(r["tokens"]), r["variant"], f"{r['cpu_s'] / d['cpu_s']:.2f}", f"{r['wall_s'] / d['wall_s']:.2f}"])
    section("body", ["tokens", "body layers", "variant", "step × SDPA (CPU)", "step × SDPA (wall)", "peak MiB", "peak × SDPA"],
            lambda r, d: [str(r["tokens"]), str(r["layers"]), r["variant"], f"{r['cpu_s'] / d['cpu_s']:.2f}",
                          f"{r['wall_s'] / d['wall_s']:.2f}", f"{r['peak_MiB']:.0f}", f"{r['peak_MiB'] / d['peak_MiB']:.3f}"])
    def same_cache(r):   # tokens/s against dense SDPA with the row's own cache
        d = next((x for x in rows if x["part"] == "decode" and x["tokens"] == r["tokens"]
                  and x["variant"].startswith("dense-sdpa") and x.get("cache", "dynamic") == r.get("cache", "dynamic")), None)
        return f"{d['cpu_s'] / r['cpu_s']:.2f}" if d else "–"

    section("decode", ["context", "variant", "KV cache", "ms per token (CPU)", "tokens/s × dense (CPU)",
                       "tokens/s × dense (wall)", "× dense, same cache (CPU)"],
            lambda r, d: [str(r["tokens"]), r["variant"], r.get("cache", "dynamic"), f"{r['cpu_s'] * 1e3:.1f}",
                          f"{d['cpu_s'] / r['cpu_s']:.2f}", f"{d['wall_s'] / r['wall_s']:.2f}", same_cache(r)])
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--layers", type=int, default=2, help="body layers for part 2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["attention", "body", "decode"],
                    choices=["attention", "body", "decode", "flex"], help="flex: compiled FlexAttention inference "
                    "against the gather kernel (not in the default: the first compile takes minutes)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, "lowrank"],
                    help="the sparse variants of parts 1 and 3 (attention, decode; decode has no window); lowrank "
                         "is fitted on one random sequence")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_speed.json"))
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run's JSON (of --parts, "
                    "when given)")
    args = ap.parse_args(argv)
    if args.report:
        given = "--parts" in (argv if argv is not None else sys.argv)
        print(tables(json.loads(Path(args.report).read_text())["rows"], args.parts if given else None))
        return
    started = time.time()
    meta = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), "python"] + sys.argv),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_before": os.getloadavg()}
    rows = []

    def save():
        meta.update(seconds=time.time() - started, load_after=os.getloadavg())
        tmp = Path(args.out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        os.replace(tmp, args.out)

    parts = {"attention": (1, args.lengths, attention_rows), "body": (args.layers, args.lengths, body_rows),
             "flex": (1, args.lengths, flex_rows), "decode": (None, args.decode_lengths, decode_rows)}
    for part, (layers, lengths, measure) in parts.items():
        if part in args.parts:
            model = build_model("smollm2-135m", random_weights=True, layers=layers)
            for T in lengths:
                rows += measure(model, T, args.repeat, *([args.variants] if part in ("attention", "decode") else []))
                save()
    save()
    print(json.dumps(meta))
    print(tables(rows))


if __name__ == "__main__":
    main()
