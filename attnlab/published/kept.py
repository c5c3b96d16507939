"""The in-progress tables of a run whose finished work is kept in git (`keep:`, attnlab/keep.py).

    <!-- render:kept_run:CONFIG -->      the cells, in the order they run, with what is known of each
    <!-- render:kept_sweep:CONFIG -->    every finished point of every sweep

CONFIG is the run's config (relative to the repository root); its `keep:` names the kept folder.
The numbers are the kept files' own; no interval is computed here (the run's report.md has the
paired intervals once every cell is in). A point's curve is "still falling" when its last
validation interval lowered the loss by 0.5% or more, the criterion the config states.

The run refuses a kept file of other settings (attnlab/keep.py); the tables do too, as far as the
config alone tells (the arm's method options; the base and data fingerprints need the model): a
cell or point of an edited arm is an error, not a row of numbers the config no longer makes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import DataError

FALLING = 0.005   # a relative fall of the validation loss over the last interval that counts as still falling


def _load(root: Path, arg: str):
    from ..experiment import load_config
    from ..run_order import cell_order

    from .tables import in_repo

    cfg = load_config(in_repo(root, arg, "config"))
    if not cfg.get("keep"):
        raise DataError(f"{arg} has no keep: folder; kept_run / kept_sweep render a run that keeps its cells")
    return cfg, in_repo(root, cfg["keep"], "keep folder"), cell_order(cfg)


def _json(path: Path, key: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is damaged (not JSON); rerun the config to rewrite it") from None
    if not isinstance(d, dict) or not isinstance(d.get(key), dict):
        raise DataError(f"{path} is not a file attnlab kept (no {key}); move it out of the keep folder")
    return d


def _arm(m: dict) -> dict:
    """The arm's method options as a kept cell's spec records them (its training settings aside)."""
    return json.loads(json.dumps({k: v for k, v in m.items() if k not in ("seeds", "train")}, default=str))


def _read(path: Path, m: dict) -> dict | None:
    """A kept cell of arm `m`, refused when its spec records other method options (an edited arm:
    the table would show numbers of settings the config no longer has)."""
    if not path.is_file():
        return None
    c = _json(path, "spec")
    kept = {k: v for k, v in (c["spec"].get("method") or {}).items() if k not in ("train", "_chosen_on_seed")}
    if kept != _arm(m):
        from ..keep import differences
        raise DataError(f"{path} was computed with other settings of {m['name']} "
                        f"({', '.join(differences(kept, _arm(m)))} differ); restore them, or make the change a new arm")
    return c


def _points(cell_dir: Path, m: dict) -> list[dict]:
    from ..experiment import _options, make_config

    plugin = json.loads(json.dumps({"method": m["method"], "options": dataclasses.asdict(
        make_config(m["method"], **_options(m)))}, default=str))
    points = [_json(p, "mark") for p in sorted((cell_dir / "sweep").glob("*.json"))]
    for p in points:
        if (p["mark"].get("run") or {}).get("plugin") != plugin:
            raise DataError(f"{cell_dir / 'sweep'} holds a point trained with other settings of {m['name']}; "
                            f"restore them, or make the change a new arm")
    return sorted(points, key=lambda p: json.dumps({k: v for k, v in p["row"].items() if k != "val_loss"}))


def _ending(row: dict, val_history: list | None, cap: int) -> str:
    if row.get("diverged"):
        return "diverged"
    if row.get("stopped_early"):
        return f"early stop (best step {row.get('best_step')})"
    v = [x for _, x in val_history or []]
    falling = len(v) >= 2 and (v[-2] - v[-1]) / abs(v[-2]) >= FALLING
    return f"cap {cap}, " + ("**still falling**" if falling else "flat") + f" (best step {row.get('best_step')})"


def _swept(row: dict) -> str:
    keys = [k for k in row if k not in ("val_loss", "steps", "tokens", "best_step", "stopped_early", "diverged")]
    return ", ".join(f"{k} {row[k]:g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys) or "–"


def kept_run(root: Path, arg: str) -> str:
    from ..experiment import SWEEP_KEYS

    cfg, keep, order = _load(root, arg)
    cells = {(m["name"], s): _read(keep / m["name"] / f"seed{s}" / "result.json", m) for m, s in order}
    frozen = next((c for c in cells.values() if c and c["type"] == "frozen"), None)
    lines = ["| # | arm | seed | state | chosen | val CE | steps | test CE | test PPL | vs frozen | answers "
             "| transfer PPL |", "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    n_done = 0
    for i, (m, s) in enumerate(order, 1):
        c = cells[(m["name"], s)]
        if c is None:
            pts = _points(keep / m["name"] / f"seed{s}", m)
            state = f"sweep: {len(pts)} point{'s' * (len(pts) != 1)} done" if pts else "to do"
            lines.append(f"| {i} | {m['name']} | {s} | {state} |  |  |  |  |  |  |  |  |")
            continue
        n_done += 1
        ev, tr = c["eval"], c["train"]
        chosen = ", ".join(f"{k} {v:g}" for k, v in (tr.get("chosen") or {}).items())
        if tr.get("chosen_on_seed") is not None:   # a later seed trains the value its first seed chose
            reused = c["spec"]["method"].get("train") or {}
            chosen = ", ".join(f"{k} {reused[k]:g}" for k in SWEEP_KEYS if isinstance(reused.get(k), (int, float)))
            chosen += f" (on seed {tr['chosen_on_seed']})"
        vs = f"{ev['perplexity'] / frozen['eval']['perplexity'] - 1:+.1%}" if frozen and c is not frozen else "–"
        acc = (f"{sum(ev_ok for ev_ok in c['per_example']['test']['correct'])}/{ev['n_generated']}"
               if ev.get("n_generated") else "–")
        transfer = ", ".join(f"{v['perplexity']:.3f}" for v in c["eval_sets"].values()) or "–"
        val = f"{c['val_loss']:.4f}" if c.get("val_loss") is not None else "–"
        steps = f"{tr['steps']} (best {tr['best_step']})" if tr.get("best_step") else str(tr["steps"])
        lines.append(f"| {i} | {m['name']} | {s} | done | {chosen or '–'} | {val} | {steps} | {ev['cross_entropy']:.4f} "
                     f"| {ev['perplexity']:.3f} | {vs} | {acc} | {transfer} |")
    return "\n".join([f"{n_done} of {len(order)} cells done (kept in `{cfg['keep']}`).", ""] + lines)


def kept_sweep(root: Path, arg: str) -> str:
    cfg, keep, order = _load(root, arg)
    lines = ["| arm | seed | value | val CE | steps | ended | chosen |", "|---|---:|---|---:|---:|---|:---:|"]
    for m, s in order:
        cell_dir = keep / m["name"] / f"seed{s}"
        cell = _read(cell_dir / "result.json", m)
        chosen = (cell or {}).get("train", {}).get("chosen")
        for p in _points(cell_dir, m):
            row = p["row"]
            val = "–" if row.get("val_loss") is None else f"{row['val_loss']:.4f}"
            mark = "✓" if chosen and all(row.get(k) == v for k, v in chosen.items()) else ""
            cap = p["mark"]["point"]["steps"]
            lines.append(f"| {m['name']} | {s} | {_swept(row)} | {val} | {row.get('steps', '–')} "
                         f"| {_ending(row, (p.get('train') or {}).get('val_history'), cap)} | {mark} |")
    if len(lines) == 2:
        return "No sweep point has finished yet."
    return "\n".join(lines)
