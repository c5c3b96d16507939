"""Renderers over committed reports and files: Markdown tables in `docs/results/*.md` (a cell, a
ratio of two rows, a range, a relabelled selection of rows), an included file, the tables of an
`attnlab run` results.json, and the embedded base's quantization."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DataError

def _x(v: float) -> str:
    return f"{v:.2f}×"


def _mark(ok: bool) -> str:
    return "✔" if ok else "✘"


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
    """`FILE|COL;COL;...|ROW=>LABEL;ROW=>LABEL;...`: a table of the chosen rows (relabelled) and columns
    of a committed report, each cell as printed there (a column is looked up as in `table_cell`; a
    column `COL=>LABEL` is headed LABEL)."""
    rel, cols, rows = arg.split("|")
    text = _read(root, rel)
    cols = [c.partition("=>") for c in cols.split(";")]
    lines = ["| arm | " + " | ".join(label or c.split("@")[0].split("#")[0] for c, _, label in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for pair in rows.split(";"):
        key, _, label = pair.partition("=>")
        lines.append(f"| {label or key.replace('>', ', ')} | " + " | ".join(table_cell(text, c, key) for c, _, _ in cols)
                     + " |")
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


def in_repo(root: Path, rel: str, what: str = "results file") -> Path:
    """root/rel, refused when it lies outside the repository (an absolute path, '..', a link out):
    a rendered number must come from a file that is committed with the document."""
    path = root / rel
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise DataError(f"{rel}: the {what} a rendered block names lies outside the repository; commit it "
                        f"inside and name it relative to the repository root")
    return path


def _read(root: Path, rel: str) -> str:
    path = in_repo(root, rel)
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
    from ..report import transfer_lines

    lines = transfer_lines(_json(root, arg))
    return "\n".join(lines[next(i for i, x in enumerate(lines) if x.startswith("|")):])


def run_change(root: Path, arg: str) -> str:
    """`RESULTS_JSON|SET|METHOD[|acc]`: METHOD's change against the frozen base on SET, with its paired
    95% interval, exactly as the run's report prints it (perplexity; `acc`: answer accuracy)."""
    from ..report_intervals import _fmt_change, acc_change, ppl_change

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
            f"quantization costs cannot be measured offline (the unquantized weights need the network)")


def json_table(root: Path, arg: str) -> str:
    """`FILE|FIELD[:FORMAT][=>LABEL];...`: a results JSON's `rows` as a table, one column per FIELD
    (formatted with FORMAT, e.g. `.2f`; a FORMAT ending in a unit after a space, `.2f GiB`, appends it).
    A column written `{A}/{B}` or `[{lo:.3f}, {hi:.3f}]=>LABEL` is that template filled from the row."""
    rel, spec = arg.split("|")
    cols = []
    for c in spec.split(";"):
        c, _, label = c.partition("=>")
        field, _, fmt = ("", "", c) if "{" in c else c.partition(":")
        fmt, _, unit = (fmt, "", "") if "{" in c else fmt.partition(" ")
        cols.append((field, fmt, unit, label or field or c))
    rows = _json(root, rel)["rows"]
    lines = ["| " + " | ".join(c[3] for c in cols) + " |",
             "|" + "|".join("---:" if isinstance(rows[0].get(c[0]), (int, float)) else "---" for c in cols) + "|"]
    for r in rows:
        try:
            cells = [fmt.format(**r) if not f else format(r[f], fmt) + (f" {unit}" if unit else "")
                     for f, fmt, unit, _ in cols]
        except KeyError as e:
            raise DataError(f"{rel}: a row has no field {e.args[0]!r}") from None
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_value(root: Path, arg: str) -> str:
    """`FILE|KEY.KEY...|FORMAT[|SCALE]`: one value of a results JSON (dotted path into nested objects),
    times SCALE if given (e.g. 1000: seconds as milliseconds), formatted with FORMAT (e.g. `.1f`) — a
    single measured number quoted in a sentence."""
    rel, path, fmt, *scale = arg.split("|")
    v = _json(root, rel)
    for k in path.split("."):
        if not isinstance(v, dict) or k not in v:
            raise DataError(f"{rel}: no field {path!r} (stops at {k!r})")
        v = v[k]
    return format(v * float(scale[0]) if scale else v, fmt)


def lm_eval(root: Path, arg: str) -> str:
    """`RESULTS_JSON|TASK`: the task's metrics from an `attnlab lm-eval` results.json (lm-eval's own
    numbers, 4 significant digits; a metric's filter in brackets unless `none`) and how many of the
    task's examples were read."""
    rel, task = arg.split("|")
    d = _json(root, rel)
    if task not in d.get("results", {}):
        raise DataError(f"{rel}: no results for task {task!r} (it has {', '.join(d.get('results', {})) or 'none'})")
    parts = []
    for key, v in d["results"][task].items():
        metric, _, filt = key.partition(",")
        if filt and "stderr" not in metric and isinstance(v, (int, float)):
            parts.append(f"{metric.replace('_', ' ')}{'' if filt == 'none' else f' ({filt})'} {v:.4g}")
    n = d.get("n-samples", {}).get(task, {})
    return ", ".join(parts) + (f" ({n['effective']} of {n['original']} examples)" if n else "")
