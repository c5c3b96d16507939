"""The distilled gate's recipe, one code path for benchmarks/sparse_quality.py and `attnlab run`
(`method: sparse, variant: learned` with a `distill:` block):

  1. distil: one dense teacher pass over the training sequences caches, per layer, `rows` query rows
     per sequence (teacher.collect_teacher); every layer's gate then takes `steps` Adam steps at `lr`
     on its own rows (teacher.train_gates, via SparsePlugin.distil_gates);
  2. sweep: on each held-out sequence, the dense model once, then every selector (window, quest,
     learned top-k, learned by cumulative mass, oracle top-k) at each of its budgets, every patched
     layer sparse; per (point, sequence) a record of NLL, accuracy, KL(dense || sparse), top-1
     agreement with dense and the achieved density (quality.py summarises and compares them at
     equal density).

`common` carries the options every attached selector shares (block_size, kernel, granularity,
gate_dim, layers): the learned ones load the distilled gate's state, so they must match the plug-in
that was distilled.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .quality import key

# oracle: the dense attention mass of the kv head (summed over its G query heads), the bound for the
# learned gate, which selects per kv head; oracle-qhead: each query head ranks by its own mass, the bound
# for a selector per query head (as Quest is)
VARIANT = {"learned-mass": "learned", "oracle": "learned", "oracle-qhead": "quest"}
GATED = ("quest", "learned", "lowrank")     # the variants whose selection has a granularity


def options(selector: str, budget: dict, common: dict) -> dict:
    """The sparse options of `selector` at `budget` (a learned-mass or oracle selector is the learned
    variant with mass, or with oracle scores; oracle-qhead is the per-query-head variant, quest's,
    with oracle scores)."""
    variant = VARIANT.get(selector, selector)
    out = {"variant": variant, **{k: v for k, v in common.items() if k in ("block_size", "kernel", "layers")},
           **budget}
    if variant in GATED and "granularity" in common:
        out["granularity"] = common["granularity"]
    if selector.startswith("learned"):
        out.update({k: common[k] for k in ("gate_dim", "gate_quest") if k in common})
    if selector == "lowrank" and "rank" in common:
        out["rank"] = common["rank"]
    if selector.startswith("oracle"):
        out["oracle"] = True
    return out


def attach(model, selector: str, budget: dict, common: dict, gate_state):
    """The selector at this budget on the patched layers; the learned ones with the distilled gate,
    lowrank with its fitted indexer (gate_state holds either's weights, or both: each loads its own)."""
    from ... import attach as attach_plugin

    plugin = attach_plugin(model, "sparse", **options(selector, budget, common))
    if selector.startswith("learned") or selector == "lowrank":
        own = plugin.trainable_parameters()
        plugin.load_state_dict({k: v for k, v in (gate_state or {}).items() if k in own})
    return plugin


def teacher_key(sequences, rows: int, block_size: int, unit: str = "row") -> str:
    """What a saved teacher cache was collected from: the tokens, the rows per sequence, the block
    size, and the unit (a per-block teacher: '-block')."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(s.to(torch.int64).numpy().tobytes())
    return f"{h.hexdigest()[:16]}-rows{rows}-bs{block_size}" + ("-block" if unit == "block" else "")


def teacher(plugin, sequences, rows: int, path=None, log=None, unit: str = "row"):
    """The cached dense teacher (teacher.collect_teacher) over `sequences`; with `path`, loaded from
    that file when it holds the same sequences, rows and block size, else collected and saved there
    (so that several gate recipes share one teacher pass). None without a path: distil_gates collects it."""
    if path is None:
        return None
    from .teacher import collect_teacher

    path, k = Path(path), teacher_key(sequences, rows, plugin.config.block_size, unit)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] != k:
            from ...errors import DataError
            raise DataError(f"{path} holds the teacher of other sequences, rows, block size or unit ({saved['key']} "
                             f"!= {k}): give another teacher file")
        if log:
            log(f"[gate] teacher cache loaded from {path}")
        return saved["caches"], saved["record"]
    caches, record = collect_teacher(plugin.model, plugin, sequences, rows=rows, unit=unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")           # whole or absent: another run may be waiting for it
    torch.save({"key": k, "caches": caches, "record": record}, tmp)
    tmp.replace(path)
    return caches, record


def distil(plugin, sequences, rows: int = 512, steps: int = 2000, lr: float = 3e-3, log=None,
           target: str = "peak", teacher_file=None, unit: str | None = None) -> dict:
    """Train the attached learned plug-in's gates from the cached teacher over `sequences` (1-D token
    tensors) towards `target` (peak or mass, teacher.train_gates); teacher_file: share one teacher
    pass between recipes (teacher()). Returns the record the reports show: the teacher pass's and the
    training's seconds per token, and each layer's KL(target || gate) before and after on its train
    and held-out rows. unit: per query row or per query block (default: the selection's granularity)."""
    sequences = list(sequences)
    from .teacher import check_options

    unit = check_options(plugin.config.granularity if unit is None else unit, rows=rows, steps=steps, lr=lr,
                         target=target)                                    # before a teacher pass or file
    r = plugin.distil_gates(sequences, rows=rows, steps=steps, lr=lr, log=log, target=target, unit=unit,
                            teacher=teacher(plugin, sequences, rows, teacher_file, log, unit))
    t, g = r["teacher"], r["training"]
    return {"teacher_seconds": t["seconds"], "teacher_seconds_per_token": t["seconds"] / t["tokens"],
            "training_seconds": g["seconds"], "training_seconds_per_token": g["seconds"] / g["tokens"],
            "tokens": t["tokens"],
            "layers": {str(i): {k: x[k] for k in ("before", "after", "rows", "steps")}
                       for i, x in r["layers"].items()}}


@torch.no_grad()
def token_stats(logits, ids, dense_logp) -> dict:
    """Sums over the sequence's predicted tokens (positions 0..T-2 predict 1..T-1)."""
    logp = F.log_softmax(logits[0, :-1].float(), -1)
    target = ids[1:]
    out = {"tokens": int(target.numel()), "nll": float(-logp.gather(-1, target[:, None]).sum()),
           "correct": int((logp.argmax(-1) == target).sum())}
    if dense_logp is not None:
        out["kl"] = float(F.kl_div(logp, dense_logp, log_target=True, reduction="sum"))
        out["agree"] = int((logp.argmax(-1) == dense_logp.argmax(-1)).sum())
    return out


@torch.no_grad()
def sweep(model, sequences: dict, points: list[tuple[str, dict]], common: dict, gate_state, data: dict,
          save=None, log=None, count_work: bool = False) -> dict:
    """Read every (selector, budget) of `points` on every held-out sequence ({index: 1-D tokens}) into
    data["points"]; a (point, sequence) already there is skipped (resumable), and `save(data)` runs after
    each record. count_work: also the pairs the kernel scores over the causal pairs (the gather kernel)."""
    data.setdefault("points", {})
    dev = next(model.parameters()).device
    for si, seq in sequences.items():
        si = str(si)
        todo = [(s, b) for s, b in points if si not in data["points"].get(key(s, b), {}).get("sequences", {})]
        if not todo and si in data["points"].get("dense", {}).get("sequences", {}):
            continue
        x = seq.view(1, -1).to(dev)
        start = time.perf_counter()
        dense_logits = model(input_ids=x, use_cache=False).logits
        entry = data["points"].setdefault("dense", {"selector": "dense", "budget": {}, "sequences": {}})
        entry["sequences"][si] = {**token_stats(dense_logits, x[0], None), "density": 1.0, "work": 1.0,
                                  "seconds": time.perf_counter() - start}
        dense_logp = F.log_softmax(dense_logits[0, :-1].float(), -1)
        del dense_logits
        if save:
            save(data)
        for s, b in todo:
            plugin = attach(model, s, b, common, gate_state)
            try:
                start = time.perf_counter()
                logits = model(input_ids=x, use_cache=False).logits
                row = token_stats(logits, x[0], dense_logp)
                row.update(density=1 - plugin.sparsity(), seconds=time.perf_counter() - start)
                if count_work:   # pairs scored / causal pairs, every patched layer
                    causal = (model.config.num_attention_heads * len(plugin.layers()) * x.shape[1]
                              * (x.shape[1] + 1) / 2)
                    row["work"] = plugin.pairs_scored() / causal
                del logits
            finally:
                plugin.detach()
            pe = data["points"].setdefault(key(s, b), {"selector": s, "budget": b, "sequences": {}})
            pe["sequences"][si] = row
            if save:
                save(data)
            if log:
                log(f"[{key(s, b)}] seq {si}: density {row['density']:.3f}, nll/token "
                    f"{row['nll'] / row['tokens']:.4f}, KL {row['kl'] / row['tokens']:.4f}, {row['seconds']:.0f} s")
        del dense_logp
    return data
