"""The order in which `attnlab run` computes its cells (`order:` in the config).

By default each arm runs all its seeds before the next arm starts, in the config's order. A run
longer than one working session (kept across sessions with `keep:`, attnlab/keep.py) should
finish its most informative comparisons first: every arm's first seed (with its sweep), then the
other seeds, the most expensive arm last. `order:` lists the cells so:

    order: [frozen, bah_paper_base:0, lmhead_lora:0, bah_paper_base, lmhead_lora, lora]

`NAME:SEED` is that one cell; `NAME` is every seed of the arm not listed before it. Arms the list
leaves out run afterwards, in the config's order. With `sweep_seeds: first` an arm's later seeds
reuse the value validation chose on its first seed, so the first seed must come first (checked
here, before any model is loaded). The order changes when a cell is computed, never its numbers:
a cell's spec (attnlab/experiment.py) does not contain it.
"""

from __future__ import annotations

from .errors import ConfigError


def arm_seeds(cfg: dict, m: dict) -> list[int]:
    """The seeds one arm runs: the experiment's, or the arm's own subset; the frozen base once."""
    seeds = [s for s in cfg["seeds"] if s in m.get("seeds", cfg["seeds"])]
    return seeds[:1] if m["method"] == "frozen" else seeds


def cell_order(cfg: dict, methods: list[dict] | None = None) -> list[tuple[dict, int]]:
    """Every (arm, seed) cell of `methods` (default: all the config's arms), in the order they run."""
    methods = cfg["methods"] if methods is None else methods
    by_name = {m["name"]: m for m in cfg["methods"]}
    todo = {m["name"]: arm_seeds(cfg, m) for m in methods}
    order = [] if cfg.get("order") is None else cfg["order"]
    if not isinstance(order, list) or not all(isinstance(x, str) and x for x in order):
        raise ConfigError(f"order: expected a list of arm names (NAME or NAME:SEED), got {order!r}")
    out, seen, whole = [], set(), set()
    for i, entry in enumerate(order + [m["name"] for m in methods]):
        name, _, seed = entry.partition(":")
        where = f"order[{i}] ({entry!r})"
        if i < len(order) and not seed:
            if name in whole:
                raise ConfigError(f"{where}: {name} is listed twice; list each arm (or NAME:SEED cell) once")
            whole.add(name)
        if name not in by_name:
            raise ConfigError(f"{where}: no arm is named {name!r}; the arms are: {', '.join(by_name)}")
        if name not in todo:   # an arm --methods left out
            continue
        if seed:
            try:
                s = int(seed)
            except ValueError:
                raise ConfigError(f"{where}: the seed after ':' must be an integer") from None
            if s not in arm_seeds(cfg, by_name[name]):
                raise ConfigError(f"{where}: {name} runs seeds {arm_seeds(cfg, by_name[name])}, not {s}")
            if (name, s) in seen:
                raise ConfigError(f"{where}: {name}:{s} is listed twice; list each cell once")
            wanted = [s]
        else:
            wanted = [s for s in todo[name] if (name, s) not in seen]
        for s in wanted:
            first = arm_seeds(cfg, by_name[name])[0]
            if cfg.get("sweep_seeds") == "first" and s != first and (name, first) not in seen:
                raise ConfigError(f"{where}: {name} seed {s} comes before seed {first}, whose sweep chooses its "
                                  f"value (sweep_seeds: first); list {name}:{first} first")
            seen.add((name, s))
            out.append((by_name[name], s))
    return out
