"""`attnlab run` with `method: sparse, variant: learned` and a `distill:` block: the learned gate
distilled from the cached dense teacher instead of trained online, and the density-vs-quality
sweep on the held-out test split, both by the recipe benchmarks/sparse_quality.py runs
(attnlab/modules/sparse/recipe.py, quality.py).

    distill: {sequences: 64, rows: 512, steps: 2000, lr: 3.0e-3, heldout: 16}    # every key optional
    distill: {..., recover_steps: 200, recover_lr: 1.0e-3, recover_r: 8}        # and recovery training
    distill: {sequences: 96, target: mass}      # with granularity: row, block_size: 32: the v3 recipe

  - sequences: the first N examples of the training split are the teacher's sequences (one dense
    pass each); rows: query rows cached per sequence and layer; steps, lr: Adam on every layer's gate;
    with the method's `granularity: block` (the default) the teacher records rows // block_size whole
    query blocks and the gate learns SeerAttention's 2-D max-pooled block target, scored as the
    block selection scores (modules/sparse/teacher.py); with `granularity: row`, single rows;
  - target: what the gate learns, `peak` (default: the max-pooled attention, SeerAttention-R) or
    `mass` (each block's summed attention, what the oracle ranks by; the v3 recipe's choice on
    validation, docs/sparse_attention.md); unit: `row` or `block` (default: the granularity);
  - heldout: the first N examples of the test split (never distilled from) are read by dense and by
    window, quest, learned (top-k and cumulative mass, with the distilled gate) and the oracles at
    each of their budgets, with the method's block_size, kernel, granularity, gate_dim, gate_quest
    and layers.
  - recover_steps (default 0: none): recovery training with the selection frozen
    (modules/sparse/recovery.py): every budget of window, quest and learned top-k gets its own LoRA
    adapter (rank recover_r, Adam at recover_lr) trained recover_steps steps by token KL to dense on
    the same training examples, and is read on the same held-out examples: report.md adds that table
    and its comparisons at equal density (each selector with the same recovery budget).
The cell's `train:` options are not used (the gate takes `steps` steps of its own), and train_modules
are refused (nothing trains online). sequences and heldout above the examples the splits hold are
refused, not read as fewer.

With `variant: lowrank` the block fits the low-rank indexer instead (modules/sparse/lowrank.py: closed
form, from one dense pass over the first `sequences` training examples; nothing is trained, so the
gate's rows, steps, lr, target and unit do not apply), and the held-out sweep reads lowrank in place
of the learned selectors. A lowrank method needs the block: without it there is nothing to fit from.
"""

from __future__ import annotations

import time

import torch

from .errors import ConfigError
from .modules.sparse import quality, recipe
from .modules.sparse.teacher import shortest
from .train import TrainResult

DEFAULTS = {"sequences": 64, "rows": 512, "steps": 2000, "lr": 3e-3, "heldout": 16,
            "recover_steps": 0, "recover_lr": 1e-3, "recover_r": 8}
MAY_BE_ZERO = ("recover_steps",)
CHOICES = {"target": ("peak", "mass"), "unit": ("row", "block")}     # the keys that name, with their values
RECOVERED = ("window", "quest", "learned")      # the selectors recovery training is given to
SHARED = ("block_size", "kernel", "granularity", "gate_dim", "gate_quest", "rank", "layers")
GATE_ONLY = ("rows", "steps", "lr", "target", "unit")   # the learned gate's keys: a lowrank fit has none
# the benchmark's densities, and higher ones: short held-out blocks (few key blocks) never get sparser
DENSITIES = quality.DENSITIES + (0.5, 0.6, 0.7, 0.8, 0.9)


def distill_options(m: dict, where: str) -> dict | None:
    """The method's `distill:` block with its defaults filled (None without one); a bad block is one
    line naming the fix."""
    lowrank = m.get("method") == "sparse" and m.get("variant") == "lowrank"
    if "distill" not in m:
        if lowrank and not m.get("oracle"):
            raise ConfigError(f"{where}: variant lowrank is fitted, not trained: add distill: {{sequences: 16}} "
                              f"(the indexer's fit reads that many training examples)")
        return None
    d = m["distill"]
    if d is None:   # `distill:` with nothing after it: meant as the defaults, it used to train the gate online
        raise ConfigError(f"{where}.distill: is empty; write distill: {{}} for the defaults "
                          f"({', '.join(f'{k} {v}' for k, v in DEFAULTS.items())}), or remove the key")
    if m.get("method") != "sparse" or m.get("variant", "learned") not in ("learned", "lowrank") or m.get("oracle"):
        raise ConfigError(f"{where}.distill: distillation trains the learned gate (or fits the lowrank indexer); use "
                          f"it with method: sparse, variant: learned or lowrank (without oracle)")
    if not isinstance(d, dict):
        raise ConfigError(f"{where}.distill: expected a mapping such as {{sequences: 64, steps: 2000}}, got {d!r}")
    if m.get("train_modules"):     # else saved untrained: the block replaces the online training that trains them
        raise ConfigError(f"{where}: train_modules are trained online, and a distill: block trains nothing online: "
                          f"drop train_modules (distill.recover_steps gives each budget trained adapters instead)")
    if lowrank and set(d) & set(GATE_ONLY):
        raise ConfigError(f"{where}.distill: {sorted(set(d) & set(GATE_ONLY))} train the learned gate; the lowrank "
                          f"indexer is fitted in closed form: keep sequences, heldout and recover_* only")
    unknown = sorted(set(d) - set(DEFAULTS) - set(CHOICES))
    if unknown:
        raise ConfigError(f"{where}.distill: unknown key(s) {unknown}; the keys are {', '.join([*DEFAULTS, *CHOICES])}")
    for k, allowed in CHOICES.items():
        if k in d and d[k] not in allowed:
            raise ConfigError(f"{where}.distill.{k}: expected one of {', '.join(allowed)}, got {d[k]!r}")
    out = {**DEFAULTS, **{k: v for k, v in d.items() if k in DEFAULTS}}
    for k, v in out.items():
        kind = float if k.endswith("lr") else int
        low = 0 if k in MAY_BE_ZERO else 1e-300
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or v < low:
            raise ConfigError(f"{where}.distill.{k}: expected a {'non-negative' if low == 0 else 'positive'} "
                              f"{kind.__name__}, got {v!r}")
        out[k] = kind(v)
    if lowrank:        # nothing of the gate's recipe applies to a closed-form fit
        return {k: v for k, v in out.items() if k not in GATE_ONLY}
    return {**out, "target": d.get("target", "peak"), "unit": d.get("unit")}


def _sequences(examples, n: int) -> list[torch.Tensor]:
    return [torch.tensor(e.input_ids) for e in examples[:n]]


def distil(plugin, splits, opts: dict, log) -> tuple[TrainResult, dict]:
    """The attached learned plug-in's gates from the teacher over the first training examples (a
    lowrank plug-in's indexer fitted from them); the TrainResult the cell records (steps, teacher
    tokens, seconds) and the gate's record."""
    for key, split, n in (("sequences", splits.train, "n_train"), ("heldout", splits.eval, "n_eval")):
        if opts[key] > len(split):     # else it reads fewer than the report says it read
            raise ConfigError(f"distill.{key}: {opts[key]} is above the {len(split)} examples of the "
                              f"{'training' if key == 'sequences' else 'test'} split: use {key}: {len(split)} or "
                              f"fewer, or raise data.{n}")
    seqs = _sequences(splits.train, opts["sequences"])
    cfg = plugin.config
    if getattr(cfg, "variant", "learned") == "lowrank":
        log(f"[distill] fitting the rank-{cfg.rank} lowrank indexer from {len(seqs)} training sequences")
        record = {"calibrate": plugin.calibrate(seqs)}
        return TrainResult(steps=0, tokens=record["calibrate"]["tokens"],
                           seconds=record["calibrate"]["seconds"]), record
    unit = opts.get("unit") or cfg.granularity
    need, what = shortest(unit, cfg.block_size)
    if max(len(s) for s in seqs) < need:   # else the teacher pass records nothing, and says so only after it
        raise ConfigError(f"distill: the training examples are at most {max(len(s) for s in seqs)} tokens, and a gate "
                          f"per query {unit} learns from sequences of {what} ({need} tokens at block_size "
                          f"{cfg.block_size}); raise data.max_length or lower block_size")
    start = time.perf_counter()
    log(f"[distill] teacher pass over {len(seqs)} training sequences, then {opts['steps']} steps per layer")
    record = recipe.distil(plugin, seqs, rows=opts["rows"], steps=opts["steps"], lr=opts["lr"], log=log,
                           target=opts.get("target", "peak"), unit=opts.get("unit"))
    return TrainResult(steps=opts["steps"], tokens=record["tokens"], seconds=time.perf_counter() - start), record


def heldout_sweep(model, splits, options, opts: dict, gate_state, gate_record: dict, log) -> dict:
    """Every selector at every budget on the first `heldout` test examples, summarised with the
    intervals and the equal-density comparisons of benchmarks/sparse_quality.py."""
    seqs = _sequences(splits.eval, opts["heldout"])
    common = {k: getattr(options, k) for k in SHARED}
    lowrank = options.variant == "lowrank"      # lowrank in place of the learned selectors (no gate was trained)
    read = [s for s in quality.DEFAULT_SELECTORS if not (lowrank and s.startswith("learned"))] + ["lowrank"] * lowrank
    points = [(s, b) for s, bs in quality.budgets(options.block_size).items() for b in bs if s in read]
    data = {"meta": {"length": max((len(s) for s in seqs), default=0), "block_size": options.block_size,
                     "heldout_sequences": list(range(len(seqs))), "distill": opts, "common": common},
            "gate": gate_record}
    recipe.sweep(model, dict(enumerate(seqs)), points, common, gate_state, data, log=log)
    quality.summarise(data, densities=DENSITIES)
    if opts["recover_steps"]:
        from .modules.sparse.recovery import sweep_recovered
        rec = {"meta": {**data["meta"], "recover": {k: opts[k] for k in ("recover_steps", "recover_lr", "recover_r")}}}
        sweep_recovered(model, _sequences(splits.train, opts["sequences"]), dict(enumerate(seqs)),
                        [(s, b) for s, b in points if s in RECOVERED + ("lowrank",)], common, gate_state, rec, {},
                        steps=opts["recover_steps"], lr=opts["recover_lr"], r=opts["recover_r"], log=log)
        own = "lowrank" if lowrank else "learned"
        quality.summarise(rec, pairs=[(own, "quest"), (own, "window"), ("quest", "window")], densities=DENSITIES)
        data["recovered"] = rec
    return data


def report_lines(results: dict) -> list[str]:
    """report.md's section for every distilled cell: the density-vs-quality table on the held-out
    test split and the comparisons at equal density."""
    lines = []
    for c in results["cells"]:
        data = c.get("sparse_quality")
        if data:
            what = "Fitted lowrank indexer" if "calibrate" in (data.get("gate") or {}) else "Distilled gate"
            lines += ["", f"## {what} `{c['method']}` (seed {c['seed']}): density vs quality on the "
                      f"held-out test split", "",
                      f"{what.split()[0]} from the first {data['meta']['distill']['sequences']} training examples "
                      f"(`distill: {data['meta']['distill']}`); every selector on the patched layers with "
                      f"{', '.join(f'{k} {v}' for k, v in data['meta']['common'].items() if v is not None)}.", "",
                      quality.report(data)]
            rec = data.get("recovered")
            if rec:
                r = rec["meta"]["recover"]
                lines += ["", f"### With recovery training: each budget its own LoRA adapter (rank {r['recover_r']}, "
                          f"{r['recover_steps']} steps at lr {r['recover_lr']}, token KL to dense on the same "
                          f"training examples), the selection frozen", "", quality.report(rec)]
    return lines
