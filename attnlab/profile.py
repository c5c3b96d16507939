"""`attnlab profile`: wall time and peak memory of dense and sparse attention across sequence length.

For each length and each variant (dense eager, dense SDPA, and the sparse attentions), on the
model's transformer body (the LM head is the same for every variant and is left out):
  - inference: one forward pass without gradients;
  - training: forward + backward, gradients flowing through every layer's attention (the input
    embeddings require grad, so no parameter gradients are needed to exercise the backward);
  - decode: one generated token of the whole model (LM head included, logits of that token only)
    with a KV cache holding `length` tokens (prefilled untimed by the same variant; the cache is
    cropped back after each timed step); a sparse plug-in reads its page metadata (pages.py); the
    cache is the one `attnlab generate` uses (kvcache.generation_cache: GrowingCache with a sparse
    plug-in, DynamicCache otherwise) unless decode_cache names one; the row says which;
  - attention time: the time spent inside the attention functions during the inference forward
    (decode: during the step), isolated with torch.profiler (every variant runs through a labelled
    wrapper).
Peak memory is the tensors created during the call: on CUDA torch.cuda.max_memory_allocated, on CPU
an allocator-level dispatch mode (attnlab.memory). Timings: median of `repeat` after one warm-up
(which also triggers any compilation). Weights do not change timings, so `random_weights` profiles
a model of the same shape without loading it (e.g. on a machine without the embedded file), and the
lowrank variant's indexer is fitted on one sequence of random tokens (any fit times the same).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbone import RANDOM, RANDOM_PREFIX, TINY, decoder, layers as block_stack, load_backbone
from .modules.sparse.lowrank import calibrate_for_timing
from .kvcache import GrowingCache, generation_cache
from .memory import peak_bytes

# SmolLM2-135M's shape, for random-weight profiling where the embedded file is not at hand.
DEFAULT_VARIANTS = ["dense-eager", "dense-sdpa", "window:window=256,sinks=4", "learned:top_k=4",
                    "quest:top_k=4", "performer"]
LENGTHS = [256, 512, 1024, 2048, 4096]
LABEL = "attnlab::attention"


@dataclass
class Variant:
    name: str                      # as given, e.g. "window:window=256,sinks=4"
    kind: str                      # dense-eager | dense-sdpa | a sparse variant
    options: dict = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """'dense-eager', 'dense-sdpa', or 'VARIANT[:key=value,...]' with VARIANT one of the sparse
    attention's variants (window, learned, quest, lowrank, performer, dense)."""
    kind, _, rest = text.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        if "=" not in kv:
            raise ValueError(f"variant option '{kv}' in '{text}' is not key=value")
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    if kind.startswith("dense-") and kind not in ("dense-eager", "dense-sdpa"):
        raise ValueError(f"unknown dense kernel '{kind}': use dense-eager or dense-sdpa")
    if kind in ("dense-eager", "dense-sdpa") and opts:
        raise ValueError(f"{kind} takes no options (got {opts})")
    return Variant(text, kind, opts)


def build_model(spec: str, random_weights: bool = False, layers: int | None = None,
                device: str | None = None) -> nn.Module:
    """The model to profile; `layers` keeps only the first N transformer layers (per-layer costs
    scale linearly, and long dense baselines fit in memory)."""
    if random_weights and spec not in TINY and not spec.startswith(RANDOM_PREFIX):  # those are random already
        if spec not in RANDOM:
            raise ValueError(f"random weights are available for {', '.join(RANDOM)} (and the tiny test models), "
                             f"not '{spec}'; profile it with its own weights, or name random:<name> as the model")
        spec = RANDOM_PREFIX + spec
    model = load_backbone(spec, device=device).model   # a random base is built on the device directly
    if layers:
        stack = block_stack(model)
        if not 1 <= layers <= len(stack):
            raise ValueError(f"--layers must be between 1 and {len(stack)}, got {layers}")
        del stack[layers:]
        model.config.num_hidden_layers = layers
    if device:
        model.to(device)
    return model


def _labelled(model: nn.Module) -> None:
    """Route the model's attention through a wrapper that labels it for torch.profiler."""
    from .modules.attention import attention_function, register

    inner = model.config._attn_implementation
    fn = attention_function(inner, model)

    def labelled(*args, **kwargs):
        with torch.profiler.record_function(LABEL):
            return fn(*args, **kwargs)

    name = f"attnlab_profiled_{inner}"
    register({inner: name}, labelled)
    model._attnlab_profiled_inner = inner
    model.config._attn_implementation = name


def _unlabelled(model: nn.Module) -> None:
    model.config._attn_implementation = model._attnlab_profiled_inner


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up (and compilation)
    ts = []
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _attention_seconds(fn) -> float:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync()
    for ev in prof.key_averages():
        if ev.key == LABEL:
            dev_t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
            return (dev_t if torch.cuda.is_available() and dev_t else ev.cpu_time_total) / 1e6
    return float("nan")


def _eager_train_bytes(model: nn.Module, T: int) -> int:
    # eager keeps the T x T probabilities (and their softmax input) per layer for the backward
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * T * T * 4


def _available_bytes() -> int:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def profile(model: nn.Module, variants: list[str] | None = None, lengths: list[int] | None = None,
            modes: tuple[str, ...] = ("inference", "training"), repeat: int = 3, batch: int = 1,
            log=print, decode_cache: str = "generate") -> list[dict]:
    """One row per (variant, length, mode): seconds, peak MiB, and (inference) attention seconds.
    decode_cache: the KV cache of decode ("generate": what generation uses, kvcache.generation_cache;
    "dynamic": transformers' DynamicCache; "growing": kvcache.GrowingCache)."""
    from .modules import attach

    variants = [parse_variant(v) for v in (variants or DEFAULT_VARIANTS)]
    lengths = lengths or LENGTHS
    body = decoder(model)
    dev = next(model.parameters()).device
    emb = model.get_input_embeddings()
    base_impl = model.config._attn_implementation
    rows = []
    for v in variants:
        plugin = None
        try:
            if v.kind.startswith("dense-"):
                model.config._attn_implementation = v.kind.split("-", 1)[1]
            else:
                model.config._attn_implementation = "sdpa"
                plugin = attach(model, "sparse", variant=v.kind, **v.options)
                if v.kind == "lowrank" and not v.options.get("oracle"):   # else it refuses to run unfitted
                    calibrate_for_timing(model, plugin)
            _labelled(model)
            for T in lengths:
                g = torch.Generator().manual_seed(T)
                ids = torch.randint(0, emb.weight.shape[0], (batch, T), generator=g).to(dev)

                def forward():
                    with torch.no_grad():
                        body(input_ids=ids, use_cache=False)

                def train_step():
                    x = emb(ids).detach().requires_grad_(True)
                    body(inputs_embeds=x, use_cache=False).last_hidden_state.float().pow(2).mean().backward()

                state = {}

                def decode_step():
                    with torch.no_grad():
                        model(input_ids=ids[:, -1:], past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
                    state["cache"].crop(-1)   # back to T tokens

                for mode in modes:
                    row = {"variant": v.name, "tokens": T, "mode": mode, "batch": batch}
                    fn = {"inference": forward, "training": train_step, "decode": decode_step}[mode]
                    if mode == "decode":
                        state["cache"] = _prefilled(model, ids, decode_cache)
                        row["cache"] = "growing" if isinstance(state["cache"], GrowingCache) else "dynamic"
                    if mode == "training" and v.kind == "dense-eager" and _eager_train_bytes(model, T) > 0.7 * _available_bytes():
                        row["skipped"] = (f"needs ~{_eager_train_bytes(model, T) / 2**30:.1f} GiB for the eager "
                                          f"attention maps; {_available_bytes() / 2**30:.1f} GiB free")
                        rows.append(row)
                        log(f"[profile] {v.name} T={T} {mode}: skipped ({row['skipped']})")
                        continue
                    if mode == "training" and v.options.get("kernel") == "flex" and not torch.cuda.is_available():
                        row["skipped"] = "FlexAttention has no backward on CPU"
                        rows.append(row)
                        log(f"[profile] {v.name} T={T} {mode}: skipped ({row['skipped']})")
                        continue
                    row["seconds"] = _median_time(fn, repeat)
                    if v.options.get("kernel") == "flex" and not torch.cuda.is_available():
                        # the CPU dispatch-mode measure cannot run compiled FlexAttention inside it
                        row["peak_note"] = "not measurable on CPU for compiled FlexAttention"
                    else:
                        row["peak_MiB"] = peak_bytes(fn) / 2**20
                    if mode in ("inference", "decode"):
                        row["attention_seconds"] = _attention_seconds(fn)
                    if v.kind in ("window", "learned", "quest"):  # performer skips nothing: it approximates
                        row["sparsity"] = plugin.sparsity()
                        if v.options.get("kernel", "auto") != "flex":   # pairs scored / causal pairs
                            pairs = T + 1 if mode == "decode" else T * (T + 1) / 2
                            causal = batch * model.config.num_attention_heads * len(plugin.layers()) * pairs
                            row["work"] = plugin.pairs_scored() / causal
                    rows.append(row)
                    log(f"[profile] {v.name} T={T} {mode}: {row['seconds'] * 1e3:.1f} ms, "
                        f"peak {row.get('peak_MiB', float('nan')):.0f} MiB"
                        + (f", attention {row['attention_seconds'] * 1e3:.1f} ms" if "attention_seconds" in row else ""))
        finally:
            if hasattr(model, "_attnlab_profiled_inner"):
                _unlabelled(model)
                del model._attnlab_profiled_inner
            if plugin is not None:
                plugin.detach()
            model.config._attn_implementation = base_impl
    return rows


def _prefilled(model: nn.Module, ids: torch.Tensor, cache: str = "dynamic"):
    """A KV cache holding ids (B, T), filled by the model as it is now (untimed): transformers'
    DynamicCache, a GrowingCache, or ("generate") the one generation would use."""
    start = {"dynamic": None, "growing": GrowingCache(), "generate": generation_cache(model)}[cache]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, past_key_values=start).past_key_values


def _ratio(rows, row, key, ref_kind):
    ref = next((r for r in rows if r["variant"] == ref_kind and r["tokens"] == row["tokens"]
                and r["mode"] == row["mode"] and key in r), None)
    if ref is None or key not in row or not ref[key]:
        return None
    return row[key] / ref[key]


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "Time: median seconds per call; peak: MiB of tensors created during the call; attention: "
             "seconds inside the attention functions of one inference forward (torch.profiler); "
             "× eager / × SDPA: the same quantity relative to dense eager / dense SDPA at that length; "
             "sparsity: causal (query, key) pairs skipped; work: pairs the kernel scored (whole tiles, masked "
             "pairs included) ÷ causal pairs.", ""]
    for mode in ("inference", "training", "decode"):
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        lines += [f"## {mode}", "",
                  "| variant | tokens | time ms | × SDPA | peak MiB | × eager | × SDPA | attention ms | attn × SDPA | sparsity | work |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(sel, key=lambda r: (r["tokens"], rows.index(r))):
            if "skipped" in r:
                lines.append(f"| {r['variant']} | {r['tokens']} | skipped: {r['skipped']} ||||||||| ")
                continue

            def f(x, fmt):
                return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

            lines.append(
                f"| {r['variant']} | {r['tokens']} | {r['seconds'] * 1e3:.1f} | "
                f"{f(_ratio(rows, r, 'seconds', 'dense-sdpa'), '{:.2f}')} | {f(r.get('peak_MiB'), '{:.1f}')} | "
                f"{f(_ratio(rows, r, 'peak_MiB', 'dense-eager'), '{:.2f}')} | "
                f"{f(_ratio(rows, r, 'peak_MiB', 'dense-sdpa'), '{:.2f}')} | "
                f"{f(r.get('attention_seconds', None) and r['attention_seconds'] * 1e3, '{:.1f}')} | "
                f"{f(_ratio(rows, r, 'attention_seconds', 'dense-sdpa'), '{:.2f}')} | "
                f"{f(r.get('sparsity'), '{:.2f}')} | {f(r.get('work'), '{:.2f}')} |")
        caches = dict.fromkeys(f"{r['variant']} {r['cache']}" for r in sel if "cache" in r)
        if caches:
            lines += ["", "KV cache (dynamic: transformers' DynamicCache; growing: attnlab.kvcache.GrowingCache): "
                      + ", ".join(caches) + "."]
        lines.append("")
    notes = sorted({f"{r['variant']}: peak memory {r['peak_note']}" for r in rows if "peak_note" in r})
    lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, fname in (("seconds", "seconds per call", "profile_time.png"),
                              ("peak_MiB", "peak MiB", "profile_memory.png")):
        modes = [m for m in ("inference", "training", "decode") if any(r["mode"] == m for r in rows)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for name in dict.fromkeys(r["variant"] for r in rows):
                pts = [(r["tokens"], r[key]) for r in rows if r["variant"] == name and r["mode"] == mode and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(mode)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def write(rows: list[dict], out: str | os.PathLike, title: str, meta: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".profile.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, out / "profile.json")
    plots(rows, out)
    text = markdown(rows, title) + "\n![time](profile_time.png)\n\n![memory](profile_memory.png)\n"
    tmp = out / ".profile.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "profile.md")
    return out / "profile.md"
