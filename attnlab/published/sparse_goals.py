"""The sparse v3 goals (issue 26) judged on a benchmarks/sparse_speed.py run: each goal's measured
ratios and whether it is met, computed from the run's rows, so the verdict follows the JSON.

Every ratio is one of the benchmark's own (`sparse_speed.tables`), from this process's CPU seconds
measured interleaved in the same run:

    attention, body:  r = cpu_s(variant) / cpu_s(dense-sdpa)          (lower is faster; goal r ≤ g)
    decode:           r = tokens/s(variant) / tokens/s(dense-sdpa)
                        = cpu_s(dense-sdpa) / cpu_s(variant)          (higher is faster; goal r ≥ g)
    memory:           r = peak_MiB(variant) / peak_MiB(dense-sdpa)    (body training step; goal r ≤ g)

A goal binds quest and learned (the selectors issue 26 built); the window is listed beside them
for reference and not judged. A goal whose rows the run lacks reads "not in this run". For decoding
the ceiling is printed too: if attention cost nothing at context T, a step would cost at least the
dense step at the shortest context measured (the part that does not depend on the context, taken
as that step), so tokens/s could rise at most by dense(T) / dense(shortest).

A decode run that names each row's KV cache (`sparse_speed.py --parts decode`, given as the second
file) replaces the first file's decode rows. Its verdict is on equal caches: the sparse rows and dense
both on GrowingCache, beside the ideal on it (a dense step over only the keys a sparse step reads,
whose count gives the step's density). End to end against dense as it generates (transformers'
DynamicCache, what generation without a sparse plug-in uses) is shown beside it, with what dense
itself gains from GrowingCache, so the cache's share of that speed-up is not credited to sparsity.
The contexts shorter than the goals' are listed too, without a goal.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .tables import _json, _mark

JUDGED = ("quest", "learned")
SHOWN = ("quest", "learned", "window")


def _ref(rows: list[dict], r: dict) -> dict:
    for x in rows:
        if (x["part"], x["tokens"], x["mode"], x["variant"]) == (r["part"], r["tokens"], r["mode"], "dense-sdpa"):
            return x
    raise DataError(f"sparse_speed rows: no dense-sdpa row for {r['part']} {r['mode']} at {r['tokens']} tokens "
                    f"(a ratio needs the dense row of the same run)")


def _ratio(rows: list[dict], r: dict, key: str) -> float:
    d = _ref(rows, r)
    return d[key] / r[key] if r["part"] == "decode" else r[key] / d[key]


def _rows(rows: list[dict], part: str, mode: str, tokens: int | None) -> list[dict]:
    return [r for r in rows if r["part"] == part and r["mode"] == mode and r["variant"] in SHOWN
            and (tokens is None or r["tokens"] == tokens)]


# (goal text, part, mode, tokens or None for every length, row field, goal, at most?)
GOALS = (
    ("attention forward ≤ 0.45× SDPA at 4096, density ≈ 0.25", "attention", "inference", 4096, "cpu_s", 0.45, True),
    ("attention forward ≤ 0.35× SDPA at 8192", "attention", "inference", 8192, "cpu_s", 0.35, True),
    ("training step ≤ 0.6×: the attention function (forward + backward)", "attention", "training", None, "cpu_s", 0.6,
     True),
    ("training step ≤ 0.6×: the model body's step", "body", "training", None, "cpu_s", 0.6, True),
    ("decode tokens/s ≥ 1.3× dense at 4096 context", "decode", "decode", 4096, "cpu_s", 1.3, False),
    ("decode tokens/s ≥ 1.8× dense at 8192 context", "decode", "decode", 8192, "cpu_s", 1.8, False),
    ("training memory ≤ 1.02× SDPA (the body's step)", "body", "training", None, "peak_MiB", 1.02, True),
)


def _fmt(x: float, key: str) -> str:
    return f"{x:.3f}×" if key == "peak_MiB" else f"{x:.2f}×"


def _ideal(rows: list[dict], r: dict) -> str:
    ideal = [x for x in rows if (x["part"], x["tokens"], x["mode"], x["variant"])
             == (r["part"], r["tokens"], r["mode"], f"ideal ({r['variant']})")]
    return f" (ideal {_ratio(rows, ideal[0], 'cpu_s'):.2f}×)" if ideal else ""


def _ceiling(rows: list[dict], tokens: int) -> str:
    dense = {r["tokens"]: r["cpu_s"] for r in rows if r["part"] == "decode" and r["variant"] == "dense-sdpa"}
    if tokens not in dense or len(dense) < 2 or min(dense) >= tokens:
        return ""
    return (f"; ceiling if attention cost nothing ≈ {dense[tokens] / dense[min(dense)]:.2f}× (dense step at "
            f"{tokens} ÷ at {min(dense)})")


def goal_row(rows: list[dict], text: str, part: str, mode: str, tokens: int | None, key: str, goal: float,
             at_most: bool) -> str:
    """One Markdown row: the goal, each variant's ratio (per length when the goal spans lengths) and
    the verdict over the judged variants."""
    chosen = _rows(rows, part, mode, tokens)
    if not chosen:
        return f"| {text} | not in this run | – |"
    lengths = sorted({r["tokens"] for r in chosen})
    by_len = []
    misses, judged = [], 0
    for n in lengths:
        cells = []
        for r in sorted((r for r in chosen if r["tokens"] == n), key=lambda r: SHOWN.index(r["variant"])):
            x = _ratio(rows, r, key)
            cells.append(f"{r['variant']} {_fmt(x, key)}" + (_ideal(rows, r) if part == "attention" else ""))
            if r["variant"] in JUDGED:
                judged += 1
                if not (x <= goal if at_most else x >= goal):
                    by = abs(x - goal)
                    misses.append(f"{r['variant']}" + (f" at {n}" if tokens is None else "")
                                  + f" ({_fmt(x, key)}, by {by:.{2 if round(by, 2) else 3}f})")
        by_len.append(("" if tokens is not None else f"{n}: ") + ", ".join(cells)
                      + (_ceiling(rows, n) if part == "decode" else ""))
    verdict = ("–" if not judged else _mark(True) if not misses
               else f"✘ {'; '.join(misses)}" + ("; ✔ the rest" if len(misses) < judged else ""))
    return f"| {text} | {'; '.join(by_len)} | {verdict} |"


def _cached(rows: list[dict], variant: str, tokens: int, cache: str) -> dict | None:
    return next((r for r in rows if r["tokens"] == tokens and r.get("cache") == cache
                 and (r["variant"] == variant or r["variant"].startswith(f"{variant} ("))), None)


def _kept(ideal: dict | None, tokens: int) -> str:
    """The keys a sparse decode step reads, from the ideal row (a dense step over exactly those keys)."""
    return f" ({ideal['keys']} of {tokens} keys a step, density {ideal['keys'] / tokens:.2f})" if ideal and "keys" in ideal else ""


def decode_row(rows: list[dict], text: str, tokens: int, goal: float | None) -> str:
    """One Markdown row for a decode goal from rows that name their cache. The verdict is on equal
    caches: the sparse variants and dense both on GrowingCache, beside the ideal on it. End to end
    against dense as it generates (DynamicCache) is shown too, with what dense itself gains from the
    growing cache, so the cache's share of that speed-up is visible."""
    sparse = [r for v in JUDGED if (r := _cached(rows, v, tokens, "growing")) is not None]
    dyn, grow = _cached(rows, "dense-sdpa", tokens, "dynamic"), _cached(rows, "dense-sdpa", tokens, "growing")
    ideal = _cached(rows, "ideal", tokens, "growing")
    if not sparse or dyn is None or grow is None:
        return f"| {text} | not in this run | – |"
    same = [(r["variant"], grow["cpu_s"] / r["cpu_s"]) for r in sparse]
    cell = (f"same GrowingCache: " + ", ".join(f"{v} {x:.2f}×" for v, x in same)
            + (f" (ideal {grow['cpu_s'] / ideal['cpu_s']:.2f}×)" if ideal else "") + _kept(ideal, tokens)
            + "; end to end vs dense on DynamicCache: "
            + ", ".join(f"{r['variant']} {dyn['cpu_s'] / r['cpu_s']:.2f}×" for r in sparse)
            + f" (of which the cache alone: dense {dyn['cpu_s'] / grow['cpu_s']:.2f}×)")
    if goal is None:
        return f"| {text} | {cell} | – |"
    miss = [f"{v} ({x:.2f}×, by {goal - x:.{2 if round(goal - x, 2) else 3}f})" for v, x in same if x < goal]
    verdict = f"✘ {'; '.join(miss)}" + ("; ✔ the rest" if len(miss) < len(same) else "") if miss else "✔"
    return f"| {text} | {cell} | {verdict} (equal caches) |"


def decode_shorter(rows: list[dict], below: int) -> list[str]:
    """Rows for the decode contexts shorter than the goals' (no goal: where sparse decoding stops paying)."""
    return [decode_row(rows, f"decode tokens/s at {n} context (no goal)", n, None)
            for n in sorted({r["tokens"] for r in rows if r["part"] == "decode" and r["tokens"] < below})]


def sparse_speed_goals(root: Path, arg: str) -> str:
    """`FILE[|DECODE_FILE]`: issue 26's goals table from a benchmarks/sparse_speed.py JSON (its
    `rows`), the verdict of each goal computed from the rows (quest and learned judged, the window
    shown); the decode goals from DECODE_FILE's rows (each naming its cache) when it is given."""
    path, _, decode = arg.partition("|")
    rows = _json(root, path)["rows"]
    drows = _json(root, decode)["rows"] if decode else None
    lines = ["| goal (quest and learned; window for reference) | measured (CPU-time ratios, this run) | met? |",
             "|---|---|---|"]
    for g in GOALS:
        if drows is not None and g[1] == "decode":
            lines += decode_shorter(drows, g[3]) if g[3] == 4096 else []
            lines.append(decode_row(drows, g[0], g[3], g[5]))
        else:
            lines.append(goal_row(rows, *g))
    return "\n".join(lines)


SPEED = "benchmarks/results/sparse_speed.json"
DECODE = "benchmarks/results/sparse_speed_decode.json"


def _command(d: dict) -> str:
    return d.get("command") or d["meta"]["command"]


def readme_rows(root: Path) -> list[str]:
    """README benchmark rows: each issue-26 goal as the goals table judges it, with the command of
    the run it was read on (the decode goals on the decode rerun, which names each row's cache)."""
    speed, decode = _json(root, SPEED), _json(root, DECODE)
    out = []
    for g in GOALS:
        text, _, _, tokens, _, goal, _ = g
        on_decode = g[1] == "decode"
        rows = (decode_shorter(decode["rows"], tokens) if tokens == 4096 else []) if on_decode else []
        rows.append(decode_row(decode["rows"], text, tokens, goal) if on_decode else goal_row(speed["rows"], *g))
        for row in rows:
            label, measured, verdict = row[2:-2].split(" | ")
            out.append(f"| Sparse v3, block-shared selection (one thread, CPU-time ratios, random weights"
                       f"{'' if on_decode else ', density ≈ 0.25'}): {label} | `{_command(decode if on_decode else speed)}` "
                       f"| {measured} | {verdict} |")
    return out
