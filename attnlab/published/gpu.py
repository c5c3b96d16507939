"""Renderers over benchmarks/gpu_check.py's committed runs on a GPU: one training step of every method
on a random 1B-shaped base, the sparse kernels against dense SDPA, the RNG resume and `pytest -m cuda`."""

from __future__ import annotations

from pathlib import Path

from .tables import _json, _x


def _env(d: dict) -> str:
    e = d.get("env") or {}
    return f"{e.get('device', '?')}, torch {e.get('torch', '?')}, CUDA {e.get('cuda', '?')}"


def gpu_train_table(root: Path, arg: str) -> str:
    """`FILE`: the train section, a row per method (warm step time, peak memory, trainable parameters)."""
    d = _json(root, arg)
    t = d["sections"]["train"]
    lines = [f"`{d['command']}` on {_env(d)}: {t['base']} ({t['n_params'] / 1e9:.2f}B parameters, {t['layers']} "
             f"layers) in {t['dtype'].replace('torch.', '')}, batch {t['batch']} × {t['seq']} tokens; the step after "
             f"a warm-up step.", "",
             "| method | step (s) | peak memory (GiB) | trainable parameters | plug-in weights |", "|---|---:|---:|---:|---|"]
    for name, m in t["methods"].items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error'][:80]} | | | |")
            continue
        lines.append(f"| {name} | {m['warm_step_s']:.3f} | {m['peak_MiB'] / 1024:.1f} | {m['trainable']:,} | "
                     f"{', '.join(x.replace('torch.', '') for x in m['weights_dtype'])} |")
    return "\n".join(lines)


def gpu_sparse_table(root: Path, arg: str) -> str:
    """`FILE`: the sparse section, one row per (length, mode): each variant's time as a multiple of SDPA's."""
    d = _json(root, arg)
    s = d["sections"]["sparse"]
    by = {(r["tokens"], r["mode"], r.get("variant", "sdpa" if r["kernel"] == "sdpa" else "learned")): r
          for r in s["rows"]}
    variants = [v for v in ("quest", "learned") if any(k[2] == v for k in by)]
    kernel = next(r["kernel"] for r in s["rows"] if r["kernel"] != "sdpa")
    lines = [f"`{d['command']}` on {_env(d)}: the body of {s['base']} ({s['layers']} layers, "
             f"{s['dtype'].replace('torch.', '')}); {s['variant']}. Times are of the whole body (attention, MLPs, "
             f"selection), median of the runs after a warm-up.", "",
             "| tokens | mode | SDPA (s) | " + " | ".join(f"{v} `{kernel}` ×SDPA" for v in variants) + " | density | peak memory ×SDPA |",
             "|---:|---|---:|" + "---:|" * len(variants) + "---:|---:|"]
    for (tokens, mode, v), dense in by.items():
        if v != "sdpa":
            continue
        cells, dens, mem = [], "", []
        for var in variants:
            r = by.get((tokens, mode, var), {})
            if "median_s" in r:
                cells.append(_x(r["median_s"] / dense["median_s"]))
                dens = f"{r['density']:.2f}"
                mem.append(_x(r["peak_MiB"] / dense["peak_MiB"]))
            else:
                cells.append("failed" if "error" in r else "–")
        lines.append(f"| {tokens} | {mode} | {dense['median_s']:.3f} | " + " | ".join(cells) +
                     f" | {dens} | {' / '.join(mem) or '–'} |")
    return "\n".join(lines)


def gpu_checks(root: Path, arg: str) -> str:
    """`FILE`: one line on the RNG resume and the CUDA-only tests."""
    d = _json(root, arg)
    parts = []
    rng = d["sections"].get("rng")
    if rng:
        parts.append("a run stopped after step 2 and resumed from its checkpoint ends "
                     + ("bit-identical to an uninterrupted one" if rng.get("bit_identical") else
                        f"**not** bit-identical (max diff {rng.get('max_abs_diff')})"))
    p = d["sections"].get("pytest")
    if p:
        failed = [f.split("::")[-1].split(" ")[0] for f in p.get("failures", []) if f.startswith("FAILED")]
        parts.append(f"`pytest -m cuda`: {p['summary'].split(' in ')[0]}" + (f" ({', '.join(failed)})" if failed else ""))
    return f"{_env(d)}: " + "; ".join(parts)
