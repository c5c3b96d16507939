"""The renderers behind `python -m attnlab.docs`: each turns committed results files into the
Markdown a document publishes (a table, a row's cell, an included file).

A block `<!-- render:NAME:ARG -->` calls RENDERERS[NAME](root, ARG). Fields inside ARG are separated
by `|`. Every renderer reads only files committed in the repository, so rendering is deterministic:
the same files give the same text, and `python -m attnlab.docs check` compares it with what is
committed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import statistics
from pathlib import Path

from .errors import DataError

# --- Markdown tables in committed reports ---------------------------------------------------------


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every pipe table in `text` as (header cells, body rows of cells), the separator row dropped."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            if len(block) >= 2:
                tables.append((block[0], block[2:]))
            block = []
    return tables


def _plain(cell: str) -> str:
    return re.sub(r"[`*]", "", cell).strip()


def table_cell(text: str, column: str, row: str) -> str:
    """The cell in `column` (`NAME#k`: the k-th column of that name; `NAME@t`: from the t-th table
    that has it) of the row whose first cells are `row` (several keys joined by ">" match the first cells in turn; backticks and bold
    ignored), from the first table that has both."""
    keys = [k.strip() for k in row.split(">")]
    column, _, table_no = column.partition("@")          # "NAME@2": from the second table that has it
    column, _, nth = column.partition("#")               # "NAME#2": the second column of that name
    seen = 0
    for header, rows in md_tables(text):
        cols = [_plain(h) for h in header]
        where = [i for i, c in enumerate(cols) if c == column]
        if len(where) >= int(nth or 1):
            seen += 1
            if seen < int(table_no or 1):
                continue
            for r in rows:
                if [_plain(c) for c in r[:len(keys)]] == keys:
                    return r[where[int(nth or 1) - 1]]
    raise DataError(f"no table with a column {column!r} and a row {row!r}")


def table(root: Path, arg: str) -> str:
    """`FILE|COL;COL;...|ROW=LABEL;ROW=LABEL;...`: a table of the chosen rows (relabelled) and columns
    of a committed report, each cell as printed there (a column is looked up as in `table_cell`)."""
    rel, cols, rows = arg.split("|")
    text = _read(root, rel)
    cols = cols.split(";")
    lines = ["| arm | " + " | ".join(c.split("@")[0].split("#")[0] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for pair in rows.split(";"):
        key, _, label = pair.partition("=")
        lines.append(f"| {label or key} | " + " | ".join(table_cell(text, c, key) for c in cols) + " |")
    return "\n".join(lines)


def bench_ratio(root: Path, arg: str) -> str:
    """`FILE|KEY|VALUE|...|FIELD|REF_VALUE`: FIELD of the row matching KEY=VALUE pairs over FIELD of the
    row where the first key takes REF_VALUE instead (e.g. a variant against the reference variant)."""
    rel, *pairs, field, ref = arg.split("|")
    rows = _json(root, rel)["rows"]
    match = dict(zip(pairs[::2], pairs[1::2]))

    def find(m):
        return next(r for r in rows if all(str(r.get(k)) == v for k, v in m.items()))

    first = pairs[0]
    return _x(find(match)[field] / find({**match, first: ref})[field])


def column_range(root: Path, arg: str) -> str:
    """`FILE|COLUMN`: the smallest and largest value in COLUMN of the first table that has it."""
    rel, column = arg.split("|")
    for header, rows in md_tables(_read(root, rel)):
        cols = [_plain(h) for h in header]
        if column in cols:
            vals = sorted((leading_number(r[cols.index(column)]), r[cols.index(column)]) for r in rows)
            return f"{vals[0][1]} to {vals[-1][1]}"
    raise DataError(f"{rel}: no table with a column {column!r}")


def leading_number(cell: str) -> float:
    m = re.search(r"[-−+]?\d[\d,]*\.?\d*", cell)
    if not m:
        raise DataError(f"no number in {cell!r}")
    return float(m.group(0).replace("−", "-").replace(",", ""))


def _read(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        raise DataError(f"{rel}: no such results file (a rendered block names it)")
    return path.read_text()


def _json(root: Path, rel: str) -> dict:
    return json.loads(_read(root, rel))


def cell(root: Path, arg: str) -> str:
    """`FILE|COLUMN|ROW`: one cell of a committed report's table, as printed there."""
    rel, column, row = arg.split("|")
    return table_cell(_read(root, rel), column, row)


def ratio(root: Path, arg: str) -> str:
    """`FILE|COLUMN|ROW_A|ROW_B`: ROW_A's value over ROW_B's − 1 (their leading numbers, e.g. the mean
    perplexities over seeds), as a signed percentage. Unpaired: no interval."""
    rel, column, a, b = arg.split("|")
    text = _read(root, rel)
    return f"{100 * (leading_number(table_cell(text, column, a)) / leading_number(table_cell(text, column, b)) - 1):+.1f}%"


def include(root: Path, arg: str) -> str:
    """`PATH`: the file itself in a fenced block (so an excerpt can never drift from the file)."""
    lang = {".yaml": "yaml", ".yml": "yaml", ".py": "python", ".json": "json"}.get(Path(arg).suffix, "")
    return f"```{lang}\n{_read(root, arg).rstrip()}\n```"


def run_tables(root: Path, arg: str) -> str:
    """`RESULTS_JSON`: the in-distribution vs transfer tables of an `attnlab run` results.json, exactly
    as its report.md prints them (`attnlab.report.transfer_lines`), the heading left out."""
    from .report import transfer_lines

    lines = transfer_lines(_json(root, arg))
    return "\n".join(lines[next(i for i, x in enumerate(lines) if x.startswith("|")):])


def run_change(root: Path, arg: str) -> str:
    """`RESULTS_JSON|SET|METHOD[|acc]`: METHOD's change against the frozen base on SET, with its paired
    95% interval, exactly as the run's report prints it (perplexity; `acc`: answer accuracy)."""
    from .report import _fmt_change, acc_change, ppl_change

    rel, set_name, method, *kind = arg.split("|")
    res = _json(root, rel)
    ref = next(c["method"] for c in res["cells"] if c.get("type") == "frozen")
    n_boot = res["config"].get("eval", {}).get("bootstrap", 2000)
    if kind == ["acc"]:
        return _fmt_change(acc_change(res["cells"], method, ref, set_name, n_boot), pct=False)
    return _fmt_change(ppl_change(res["cells"], method, ref, set_name, n_boot), pct=True)


def run_wall(root: Path, arg: str) -> str:
    """`RESULTS_JSON`: the run's wall time, as minutes and seconds."""
    s = _json(root, arg)["wall_time_s"]
    return f"{int(s // 60)} min {int(s % 60)} s"


def gguf(root: Path, arg: str = "") -> str:
    """The embedded base's quantization, from benchmarks/results/gguf_tensor_types.json."""
    d = _json(root, "benchmarks/results/gguf_tensor_types.json")
    t = d["types"]
    return (f"`{d['file']}` ({d['package']}): {t.get('Q4_1', 0)} of its {d['tensors']} tensors, every attention and MLP "
            f"matrix, are 4-bit Q4_1, the token embedding (tied to the LM head) Q8_0, the {t.get('F32', 0)} norm "
            f"weights fp32. The file holds no higher-precision copy of the quantized matrices, so what the "
            f"quantization costs cannot be measured offline (the original bf16 weights need the network)")


# --- benchmark results ------------------------------------------------------------------------------

def _x(v: float) -> str:
    return f"{v:.2f}×"


def _mark(ok: bool) -> str:
    return "✔" if ok else "✘"


def _threads(d: dict) -> str:
    c = d.get("conditions") or {}
    load = c.get("load_avg_start"), c.get("load_avg_end")
    lo = f", load {load[0][0]:.1f}→{load[1][0]:.1f}" if all(load) else ""
    return f"{c.get('torch_threads', '?')} thread{'s' * (c.get('torch_threads') != 1)}{lo}, {c.get('date_utc', '?')[:10]}"


def backward_head_rows(root: Path) -> list[str]:
    d = _json(root, "benchmarks/results/backward_head.json")
    v = {r["variant"]: r for r in d["rows"]}
    p, pl, r, rl = v["paper (d=E)"], v["paper, latent 64"], v["residual (d=E)"], v["residual, latent 64"]
    cmd = f"`{d['command']}` ({_threads(d)})"
    lm = "LM-head CE training the full V × E head weight (28M parameters, as `head_ft` does)"
    return [
        f"| Backward head `paper` (d = E) train step vs {lm}, N = {d['tokens']} | {cmd} | time **{_x(p['train_x_base'])}**, "
        f"peak memory **{_x(p['train_mem_x_base'])}** | ≤ 1.5× {_mark(p['train_x_base'] <= 1.5)} / ≤ 1.5× "
        f"{_mark(p['train_mem_x_base'] <= 1.5)} |",
        f"| Backward head `paper` (d = E) inference per token vs the LM head | same run | **{_x(p['infer_x_base'])}** | "
        f"≤ 1.3× {_mark(p['infer_x_base'] <= 1.3)} |",
        f"| Decoding tokens/s through a head vs the base (KV cache, {d['prompts']} prompts × {d['decode_tokens']} forced "
        f"tokens) | same run | `paper` d = E **{_x(p['decode_x_base'])}**, latent 64 {_x(pl['decode_x_base'])}, "
        f"`residual` d = E {_x(r['decode_x_base'])}, `residual` latent 64 {_x(rl['decode_x_base'])} | ≥ 0.75× "
        f"{_mark(min(x['decode_x_base'] for x in (p, pl, r, rl)) >= 0.75)} |",
        f"| Backward head `residual` train step vs the same full-head CE | same run | d = E {_x(r['train_x_base'])}, "
        f"latent 64 {_x(rl['train_x_base'])} (two V-wide products: base logits and scores) | – |",
    ]


def _fc(d: dict) -> str:
    return (f"**{d['speedup']:.1f}×** ({d['live_s']:.1f} s → {d['cache_s']:.2f} s) of a bound of {d['bound']:.1f}× "
            f"(**{100 * d['of_bound']:.0f}%**), loss curves within {d['max_loss_diff']:.1e}")


def feature_cache_rows(root: Path) -> list[str]:
    res, pap, hft = (_json(root, f"benchmarks/results/feature_cache_{k}.json") for k in ("residual", "paper", "head_ft"))
    ok = min(x["of_bound"] for x in (res, pap, hft)) >= 0.8
    return [f"| Head-only epoch from the feature cache vs recomputing the base ({res['n']} problems, batch "
            f"{res['batch_size']}) | `{res['command']}`, `--preset paper`, `--method head_ft` ({_threads(res)}) | "
            f"backward head `residual` {_fc(res)}; `paper` {_fc(pap)}; head_ft {_fc(hft)} | ≥ 80% of the bound "
            f"{_mark(ok)} |"]


def feature_cache_table(root: Path, arg: str = "") -> str:
    """docs/backward_head.md: the feature-cache benchmark, one row per head."""
    lines = ["| head | epoch from the base (live) s | epoch from the cache s | speed-up | bound (body + head) / head "
             "| speed-up / bound | max loss-curve diff | command |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, label in (("residual", "backward head, `residual`"), ("paper", "backward head, `paper` (d = E)"),
                       ("head_ft", "head_ft")):
        d = _json(root, f"benchmarks/results/feature_cache_{key}.json")
        lines.append(f"| {label} | {d['live_s']:.1f} | {d['cache_s']:.2f} | {d['speedup']:.1f}× | {d['bound']:.1f}× | "
                     f"{100 * d['of_bound']:.0f}% | {d['max_loss_diff']:.1e} | `{d['command']}` ({_threads(d)}) |")
    return "\n".join(lines)


def linear_ce_rows(root: Path) -> list[str]:
    d = _json(root, "benchmarks/results/linear_cross_entropy_w.json")
    by = {(r["variant"], r["n"]): r for r in d["rows"] if r["grad"] == "w"}
    ns = sorted({n for _, n in by})
    ref = "linear+cross_entropy"

    def rel(variant, key):
        return [by[(variant, n)][key] / by[(ref, n)][key] for n in ns]

    t, m = rel("linear_cross_entropy (chunked, 256 rows)", "time_s"), rel("linear_cross_entropy (chunked, 256 rows)", "peak_mib")
    same = rel("linear_cross_entropy (options=None)", "time_s")
    auto = ", ".join(f"{x:.1f}×" for x in rel("linear_cross_entropy (chunked, auto)", "time_s"))
    ns_txt = " / ".join(map(str, ns))
    return [f"| head_ft loss step: `F.linear_cross_entropy` chunked by 256 rows (its default `fused_ce`) vs `F.linear` + "
            f"`F.cross_entropy`, gradient for W (N = {ns_txt} target tokens) | `{d['command']}` ({_threads(d)}) | time "
            f"{' / '.join(_x(x) for x in t)} (timing noise: the identical `options=None` path read "
            f"{' / '.join(_x(x) for x in same)}); peak memory {' / '.join(_x(x) for x in m)}; torch's \"auto\" chunking "
            f"on CPU fp32: {auto} the time | not slower {_mark(max(t) <= max(1.0, max(same)))} |"]


def factorized_rows(root: Path) -> list[str]:
    d = _json(root, "benchmarks/results/factorized_attention.json")
    lens = sorted({r["tokens"] for r in d["rows"]})
    by = {(r["arm"], r["tokens"]): r for r in d["rows"]}

    def cols(arm, key):
        return [by[(arm, n)][key] for n in lens]

    out = []
    for arm, label in (("LoRA + Factorized, recompute", f"FactorizedAttention + LoRA training step vs LoRA "
                        f"({' / '.join(map(str, lens))} tokens), `recompute: true` (the default)"),
                       ("LoRA + Factorized, no recompute", "same, `recompute: false`"),
                       ("LoRA + Factorized pre_rope, recompute", "same, `recompute: true`, `placement: pre_rope`")):
        if (arm, lens[0]) not in by:
            continue
        t, m = cols(arm, "cpu_x"), cols(arm, "mem_x")
        cmd = f"`{d['command']}` ({_threads(d)}; ratios of CPU time)" if not out else "same run"
        out.append(f"| {label} | {cmd} | time {' / '.join(_x(x) for x in t)}; peak memory "
                   f"{' / '.join(_x(x) for x in m)} | ≤ 1.15× {_mark(max(t) <= 1.15)} / ≤ 1.1× {_mark(max(m) <= 1.1)} |")
    return out


def factorized_table(root: Path, arg: str = "") -> str:
    """docs/factorized_attention.md: every arm and length of benchmarks/results/factorized_attention.json."""
    d = _json(root, "benchmarks/results/factorized_attention.json")
    ref = d["reference"]
    lines = [f"Run: `{d['command']}` ({_threads(d)}; {d['conditions']['seconds'] / 60:.0f} min).", "",
             f"| tokens | arm | step s (wall) | wall × {ref} | CPU s | **CPU × {ref}** | peak MiB | **memory × {ref}** |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        arm = r["arm"].replace("LoRA + ", "+ ") if r["arm"] != ref else ref
        lines.append(f"| {r['tokens']} | {arm} | {r['step_s']:.2f} | {r['time_x']:.3f} | {r['cpu_s']:.2f} | "
                     f"{r['cpu_x']:.3f} | {r['peak_MiB']:.0f} | {r['mem_x']:.3f} |")
    return "\n".join(lines)


def factorized_span(root: Path, arg: str) -> str:
    """`ARM|KEY`: the smallest and largest KEY (cpu_x, mem_x) of ARM over the lengths, as 'a–b×'."""
    arm, key = arg.split("|")
    vals = [r[key] for r in _json(root, "benchmarks/results/factorized_attention.json")["rows"] if r["arm"] == arm]
    return f"{min(vals):.2f}–{max(vals):.2f}×"


def sparse_memory_rows(root: Path) -> list[str]:
    d = _json(root, "benchmarks/results/sparse_memory.json")
    lens = sorted({r["tokens"] for r in d["rows"]})
    peak = {(r["variant"], r["tokens"]): r["peak_MiB"] for r in d["rows"]}

    def x(v):
        return " / ".join(f"{peak[(v, n)] / peak[('dense-sdpa', n)]:.2f}×" for n in lens)

    floor = max(peak[("floor (attention keeps nothing)", n)] / peak[("dense-sdpa", n)] for n in lens)
    best = min(peak[(v, n)] / peak[("dense-sdpa", n)] for v in ("window 256 + 4 sinks", "quest top-4", "learned top-4")
               for n in lens)
    return [f"| Sparse training-step peak memory vs dense SDPA, {d['layers']} layers ({' / '.join(map(str, lens))} tokens) "
            f"| `{d['command']}` | window {x('window 256 + 4 sinks')}, quest top-4 {x('quest top-4')}, learned top-4 "
            f"{x('learned top-4')}; an attention that keeps nothing (the floor) **{x('floor (attention keeps nothing)')}** "
            f"| ≤ 0.7× {_mark(best <= 0.7)}{' (below the floor)' if floor > 0.7 else ''} |"]


def _kernel_ratio(rows, variant, mode) -> float:
    sel = sorted((r for r in rows if (r["variant"], r["mode"]) == (variant, mode)), key=lambda r: r["layer"])
    ref = sorted((r for r in rows if (r["variant"], r["mode"]) == ("dense-sdpa", mode)), key=lambda r: r["layer"])
    return statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(sel, ref))


def sparse_kernel_rows(root: Path) -> list[str]:
    d = _json(root, "benchmarks/results/sparse_kernel.json")
    T = d["rows"][0]["tokens"]

    def x(v):
        return f"{_kernel_ratio(d['rows'], v, 'inference'):.2f}× / {_kernel_ratio(d['rows'], v, 'training'):.2f}×"

    ok = {v: _kernel_ratio(d["rows"], v, "inference") <= 0.4 for v in
          ("window 256 + 4 sinks", "quest top-2", "learned top-2 (distilled gate)")}
    return [f"| Sparse attention time at {T} tokens vs dense SDPA, forward / training (WikiText-2 text, median over "
            f"layers of CPU-time ratios, one run) | `{d['command']}` | window 256 **{x('window 256 + 4 sinks')}**; learned "
            f"top-2 (distilled gate) {x('learned top-2 (distilled gate)')}; quest top-2 {x('quest top-2')} | ≤ 0.4× "
            f"{_mark(ok['window 256 + 4 sinks'])} window, {_mark(ok['quest top-2'])} quest, "
            f"{_mark(ok['learned top-2 (distilled gate)'])} learned |"]


# --- sparse quality (benchmarks/sparse_quality.py's JSON) -------------------------------------------

@functools.lru_cache(maxsize=None)
def _sparse_module(root: Path):
    spec = importlib.util.spec_from_file_location("sparse_quality_report", root / "benchmarks" / "sparse_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quality(root: Path, length: str) -> dict:
    """The JSON with its summaries recomputed from the per-sequence records by the benchmark's own
    `summarise` (deterministic bootstrap), so nothing stored by an older version is quoted."""
    data = _json(root, f"benchmarks/results/sparse_quality_{length}.json")
    _sparse_module(root).summarise(data)
    return data


def _ranges(xs: list[int]) -> str:
    """[117, 118, 119, 121] -> '117–119, 121'."""
    out, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(x) if x == start else f"{start}–{x}")
            start = None
    return ", ".join(out)


def measured_on(data: dict, root: Path) -> str:
    """Which text and which of its sequences a sparse-quality result was read on."""
    m = data["meta"]
    seqs = [int(i) for i in _sparse_module(root).complete(data)]
    name = "WikiText-2 validation" if "wikitext-2" in m["text"] and m["text"].endswith("valid.txt") else m["text"]
    return (f"{name} text ({Path(m['text']).name}), {len(seqs)} held-out sequences of {m['length']} tokens "
            f"(sequences {_ranges(seqs)} of its {m['sequences']}; other text gives other numbers)")


def _ci(s: dict) -> str:
    lo, hi = s.get("ppl_change_lo"), s.get("ppl_change_hi")
    return f"{100 * s['ppl_change']:+.1f}%" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else "")


def _budget(b: dict) -> str:
    """{'window': 256, 'sinks': 4} -> '256 + 4 sinks'; {'top_k': 2} -> 'top-2'; {'mass': 0.5} -> 'mass 0.5'."""
    names = {"top_k": "top-{}", "window": "{}", "sinks": "+ {} sinks"}
    return " ".join(names.get(k, k + " {}").format(v) for k, v in b.items())


def sparse_goal(root: Path, arg: str) -> str:
    """`LENGTH`: each selector's densest budget at density ≤ 0.25 (≥ 75% block sparsity) and its
    perplexity change against dense, from sparse_quality_LENGTH.json."""
    data = _quality(root, arg)
    best = {}
    for p in data["points"].values():
        s = p.get("summary")
        if s and p["selector"] != "dense" and s["density"] <= 0.25 and (
                p["selector"] not in best or s["density"] > best[p["selector"]][1]["density"]):
            best[p["selector"]] = (p["budget"], s)
    parts = [f"{sel} {_budget(b)} ({s['density']:.2f}) {_ci(s)}"
             for sel, (b, s) in sorted(best.items(), key=lambda kv: kv[1][1]["ppl_change"])]
    return "; ".join(parts)


def sparse_table(root: Path, arg: str) -> str:
    """`LENGTH|FIRST_COLUMN`: the table of benchmarks/sparse_quality.py's report (from its JSON) whose
    header starts with FIRST_COLUMN (`selector`: every budget; `A`: equal-density comparisons)."""
    length, first = arg.split("|")
    text = _sparse_module(root).report(_quality(root, length))
    for header, rows in md_tables(text):
        if header[0] == first:
            lines = text.splitlines()
            start = lines.index("| " + " | ".join(header) + " |")
            return "\n".join(lines[start:start + len(rows) + 2])
    raise DataError(f"sparse_quality_{length}.json's report has no table starting with {first!r}")


def sparse_compare(root: Path, arg: str) -> str:
    """`LENGTH|A|B|DENSITY`: A against B at equal density, with both intervals and the sign count."""
    length, a, b, dens = arg.split("|")
    c = next(c for c in _quality(root, length)["comparisons"]
             if (c["a"], c["b"]) == (a, b) and abs(c["density"] - float(dens)) < 1e-9)
    noise = c["lo"] <= 0 <= c["hi"] or c["t_lo"] <= 0 <= c["t_hi"]
    return (f"{100 * c['change']:+.1f}% [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] (t-interval "
            f"[{100 * c['t_lo']:+.1f}, {100 * c['t_hi']:+.1f}]; better on {c['a_better_on']}/{c['sequences']}"
            f"{'; within noise' if noise else ''})")


def sparse_text(root: Path, arg: str) -> str:
    """`LENGTH`: which text and sequences the sparse quality numbers were measured on."""
    return measured_on(_quality(root, arg), root)


def sparse_quality_rows(root: Path) -> list[str]:
    out = []
    for length in ("2048", "4096"):
        data = _quality(root, length)
        n = data["points"]["dense"]["summary"]["sequences"]
        cmds = data["meta"].get("commands") or [data["meta"]["command"]]
        ok = any(p["summary"]["density"] <= 0.25 and p["summary"]["ppl_change"] <= 0.02
                 for p in data["points"].values() if p.get("summary") and p["selector"] != "dense")
        out.append(f"| Sparse at ≥ 75% block sparsity (density ≤ 0.25), perplexity vs dense, {length} tokens, measured on "
                   f"{measured_on(data, root)} (95% bootstrap over sequences) | "
                   + "; ".join(f"`{c}`" for c in cmds) + f" | {sparse_goal(root, length)} | ≤ +2% {_mark(ok)} |")
    cmp = " ".join(f"{length}: learned vs quest at density {dens}: {sparse_compare(root, f'{length}|learned|quest|{dens}')}."
                   for length, dens in (("2048", "0.25"), ("2048", "0.4"), ("4096", "0.15")))
    out.append(f"| Learned gate vs Quest at equal density (same runs, interpolated per sequence) | "
               f"`python benchmarks/sparse_quality.py --length 2048 --report` (and `--length 4096`) | {cmp} | beats Quest "
               f"{_mark(False)} |")
    return out


def benchmark_table(root: Path, arg: str = "") -> str:
    """README: every benchmark row, rendered from benchmarks/results/*.json."""
    lines = ["| benchmark | command (conditions) | result | goal |", "|---|---|---|---|"]
    for rows in (backward_head_rows, feature_cache_rows, linear_ce_rows, factorized_rows, sparse_memory_rows,
                 sparse_kernel_rows, sparse_quality_rows):
        lines += rows(root)
    return "\n".join(lines)


RENDERERS = {"include": include, "cell": cell, "ratio": ratio, "range": column_range, "run_tables": run_tables,
             "run_change": run_change, "run_wall": run_wall, "gguf": gguf, "table": table, "bench_ratio": bench_ratio,
             "factorized_table": factorized_table, "factorized_span": factorized_span,
             "benchmarks": benchmark_table, "feature_cache": feature_cache_table, "sparse_goal": sparse_goal,
             "sparse_table": sparse_table, "sparse_compare": sparse_compare, "sparse_text": sparse_text}


def render_one(expr: str, root: Path) -> str:
    """Run the renderer an `NAME:ARG` (or `NAME`) expression names."""
    name, _, arg = expr.partition(":")
    if name not in RENDERERS:
        raise DataError(f"unknown renderer {name!r} in a rendered block (known: {', '.join(RENDERERS)})")
    return RENDERERS[name](root, arg)
