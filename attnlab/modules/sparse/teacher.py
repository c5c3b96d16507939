"""The dense teacher: what the selectors approximate, and the cached teacher the gates train from.

Per query row r (query head g of kv head h) and key block j, from the dense softmax A_g(r, .):
    mass_g(r, j) = sum_{x in j} A_g(r, x)      what a selection of j keeps (the oracle ranks by it)
    peak_g(r, j) = max_{x in j} A_g(r, x)      max-pooled: the learned gate's target (SeerAttention-R)
Both are computed in chunks of TEACHER_ROWS rows (memory ~ rows x Tk), without gradients.

Cached teacher (train the gates layer by layer without running the model again): one dense forward
pass per training sequence stores, for every patched layer, what its gate reads and what it should
predict, for `rows` sampled query rows that have candidates:
    q       (N, Hq, D)         the rows' queries before RoPE        pos (N,) their positions
    seq     (N,)               which sequence each row comes from
    stats   (S, Hkv, nfull, 3D) every sequence's pooled keys before RoPE (max, min, mean per block)
    target  (N, Hkv, nfull)    max over the G heads of peak, on the candidates, normalised to sum 1
    mass    (N, Hkv, nfull)    sum over the G heads of mass (to score a selection's recall)
    cand    (N, nfull)         the candidate blocks of each row
    quest   (N, Hkv, nfull)    Quest's bound in logits, max over the G heads: only when the layer's gate
                               reads it (gate_quest); the cache of a plain gate leaves it out (memory)
With unit "block" (the gate of a `granularity: block` selection, which scores a query block by the
mean of its rows' gate queries) whole query blocks are sampled, `rows` // bs of them, and the target
is per (query block, key block) as SeerAttention computes it: the 2-D max-pool of the attention
over the block's rows, its G heads and the key block's keys (or, target "mass", the block's summed
mass: what the block oracle ranks by), on the query block's candidates (the first query blocks have
none and drop out of the loss), normalised to sum 1:
    q, pos  (Nb*bs, ...) the blocks' rows, block by block       seq (Nb,)  block (bs,) its size
    target, mass (Nb, Hkv, nfull)                               cand (Nb, nfull)
Then each layer's gate trains for `steps` Adam steps on minibatches of its own rows (gate.gate_kl);
the target is `peak` (SeerAttention-R's max-pool, above) or `mass`: the kv head's mass on the
candidates, normalised to sum 1, i.e. the very quantity the oracle ranks by, so that a top-k of the
gate's scores aims at the blocks that hold the most attention rather than the sharpest single key
(the two differ when a block holds many moderate weights). The layers are independent, and train side by side as one batched computation (their weights
stacked along a layer axis): the model is not run again.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ...errors import DataError
from ..base import PluginError
from .gate import BlockGate, gate_kl, unrope
from .pooling import key_stats, minmax
from .patterns import Pattern
from .quest import quest_bound

TEACHER_ROWS = 256   # query rows (per head) per chunk of the teacher's dense attention


def dense_probs(q, k, allowed, scale):
    """(B, Hq, Tq, Tk) softmax probabilities; allowed (B|1, Hkv|1, G*Tq, Tk) bool over the G query
    heads of each kv head (Pattern.full_mask); rows with no visible key are 0."""
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    s = (q.reshape(b, hkv, -1, q.shape[-1]) @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0).view(b, hq, tq, tk)


@torch.no_grad()
def row_block_stats(q, k, p: Pattern, base, scale, rows: torch.Tensor | None = None):
    """mass, peak (B, Hq, R, nb) of the dense causal attention for query rows `rows` (indices into
    Tq; default all). A padding row (its own key masked) gets zeros."""
    b, hq, tq, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    rows = torch.arange(tq, device=q.device) if rows is None else rows
    mass = q.new_zeros(b, hq, len(rows), p.nb)
    peak = q.new_zeros(b, hq, len(rows), p.nb)
    kpos = torch.arange(tk, device=q.device)
    for c0 in range(0, len(rows), TEACHER_ROWS):
        r = rows[c0:c0 + TEACHER_ROWS]
        allowed = (kpos[None] <= (r + p.qoff)[:, None])[None, None]
        if base is not None:
            real = base[:, 0, r, (r + p.qoff)]                                    # (B|1, R): the row's own key
            allowed = allowed & base[:, :, r] & real[:, None, :, None]
        g = hq // hkv
        allowed = allowed[:, :, None].expand(-1, -1, g, -1, -1).reshape(allowed.shape[0], 1, -1, tk)
        probs = F.pad(dense_probs(q[:, :, r], k, allowed, scale), (0, p.nb * bs - tk))
        probs = probs.view(b, hq, len(r), p.nb, bs)
        mass[:, :, c0:c0 + len(r)] = probs.sum(-1)
        peak[:, :, c0:c0 + len(r)] = probs.amax(-1)
    return mass, peak


def gate_target(peak: torch.Tensor, hkv: int, cand: torch.Tensor) -> torch.Tensor:
    """peak (B, Hq, R, nb) -> (B, Hkv, R, nfull): max over the G heads of a kv head, on the candidate
    blocks (R, nfull), rows normalised to sum 1 (0 where a row has no candidate mass)."""
    b, hq, r, nb = peak.shape
    nfull = cand.shape[-1]
    t = peak.view(b, hkv, hq // hkv, r, nb).amax(2)[..., :nfull] * cand
    return t / t.sum(-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


# --- the cached teacher ----------------------------------------------------------------------------

UNITS = ("row", "block")


def check_unit(unit) -> str:
    """`unit` if it is one of UNITS, else PluginError naming them."""
    if unit not in UNITS:
        raise PluginError(f"unknown gate unit {unit!r}; use one of: {', '.join(UNITS)}")
    return unit


def check_options(unit, rows: int, steps: int, lr: float, target: str, batch: int = 256) -> str:
    """The gate distillation's options (plugin.distil_gates, recipe.distil), checked before any
    teacher pass; returns the unit. PluginError, one line naming the option, otherwise."""
    check_unit(unit)
    for name, value, low in (("rows", rows, 1), ("batch", batch, 1), ("steps", steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PluginError(f"distil_gates: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise PluginError(f"distil_gates: lr must be a positive number, got {lr!r}")
    if target not in TARGETS:
        raise PluginError(f"unknown gate target {target!r}; use one of: {', '.join(TARGETS)}")
    return unit


def shortest(unit: str, bs: int) -> tuple[int, str]:
    """The fewest tokens a sequence needs for the teacher to record anything per `unit`, and why: a
    row has candidates from block 3 on (blocks 0, i-1, i are always kept), a whole query block
    counts only when complete, so the first complete block with candidates ends at 4 bs."""
    return (4 * bs, "4 complete blocks") if unit == "block" else (3 * bs + 1, "more than 3 blocks")


class Recorder:
    """Set on a SparseLayer while the dense teacher runs: stores what the layer's gate needs, per
    sampled query row (unit "row") or per sampled whole query block (unit "block")."""

    def __init__(self, rows: int, seed: int, unit: str = "row"):
        self.rows, self.seed, self.unit = rows, seed, check_unit(unit)
        self.block_size: int | None = None       # the layer's, once a sequence was seen
        self.parts: list[dict] = []

    def __call__(self, layer, q, k, base, scale, p: Pattern):
        if p.qoff or q.shape[0] != 1:
            raise ValueError("the cached teacher records one full sequence at a time (batch 1, no KV cache)")
        self.block_size = p.bs
        block = self.unit == "block"
        cand = p.candidates(per_block=block)                                   # (tq | nq, nfull)
        if block:
            cand = cand[:p.tq // p.bs]                                         # whole query blocks only
        have = torch.nonzero(cand.any(-1)).flatten()
        if len(have) == 0:
            return
        gen = torch.Generator().manual_seed(self.seed * 100003 + len(self.parts))
        n = max(1, self.rows // p.bs) if block else self.rows
        units = have[torch.randperm(len(have), generator=gen)[:n].to(have.device)].sort().values
        rows = (units[:, None] * p.bs + torch.arange(p.bs, device=units.device)).flatten() if block else units
        mass, peak = row_block_stats(q, k, p, base, scale, rows)              # (1, Hq, R, nb)
        hkv = k.shape[1]
        g = q.shape[1] // hkv
        if block:   # 2-D pooling over each block's rows: max of the peaks, sum of the masses
            peak = peak.view(1, q.shape[1], len(units), p.bs, p.nb).amax(3)
            mass = mass.view(1, q.shape[1], len(units), p.bs, p.nb).sum(3)
        kpre = unrope(k, torch.arange(p.tk, device=k.device), layer.rope)
        part = {
            "q": unrope(q[:, :, rows], rows + p.qoff, layer.rope)[0].transpose(0, 1).contiguous(),
            "pos": rows + p.qoff,
            "stats": key_stats(kpre, p.nfull, p.bs)[0],
            "target": gate_target(peak, hkv, cand[units])[0].transpose(0, 1).contiguous(),
            "mass": mass.view(1, hkv, g, len(units), p.nb).sum(2)[0, :, :, :p.nfull].transpose(0, 1).contiguous(),
            "cand": cand[units],
        }
        if getattr(getattr(layer, "gate", None), "reads_quest", False):
            lo, hi = minmax(k, p.nfull, p.bs)                                  # Quest's pages (post-RoPE)
            bound = (quest_bound(q, lo, hi, p, True, None, scale)[:, :, units] if block    # (1, Hkv, units, nfull)
                     else quest_bound(q[:, :, rows], lo, hi, p, False, None, scale))
            part["quest"] = bound[0].transpose(0, 1).contiguous()
        if block:
            part["n"] = len(units)
        self.parts.append(part)

    def cache(self) -> dict:
        """The parts of every recorded sequence as one cache (stats padded to the longest sequence).
        Consumes the parts key by key, so the recorder and the cache never both hold the whole (96
        sequences of 2048 tokens at block 32 are ~6 GB)."""
        if not self.parts:
            if self.block_size is None:
                raise PluginError("nothing was recorded: no sequence was given; give the teacher at least one")
            need, what = shortest(self.unit, self.block_size)
            raise PluginError(f"nothing was recorded: per query {self.unit} a sequence needs {what} ({need} tokens at "
                              f"block_size {self.block_size}) to have candidate blocks; give longer sequences or "
                              f"a smaller block_size")
        nfull = max(part["stats"].shape[1] for part in self.parts)
        out = {}
        if self.unit == "block":   # one seq entry per block; block: (bs,) whose length is the block size
            out["block"] = torch.zeros(self.parts[0]["q"].shape[0] // self.parts[0]["n"], dtype=torch.bool)
        out["seq"] = torch.cat([torch.full((part.get("n", len(part["pos"])),), i, dtype=torch.long,
                                           device=part["pos"].device) for i, part in enumerate(self.parts)])
        for key, dim, join in (("q", None, torch.cat), ("pos", None, torch.cat), ("stats", 1, torch.stack),
                               ("target", 2, torch.cat), ("mass", 2, torch.cat), ("cand", 1, torch.cat),
                               ("quest", 2, torch.cat)):
            if key not in self.parts[0]:                      # quest: only for a gate that reads it
                continue
            xs = []
            for part in self.parts:
                x = part.pop(key)
                if dim is not None and x.shape[dim] < nfull:    # to nfull blocks along `dim`
                    x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, nfull - x.shape[dim]])
                xs.append(x)
            out[key] = join(xs)
            del xs
        self.parts = []
        return out


@torch.no_grad()
def collect_teacher(model, plugin, sequences, rows: int = 512, seed: int = 0,
                    unit: str = "row") -> tuple[dict[int, dict], dict]:
    """One dense forward per sequence (1-D token tensors); returns {layer_idx: cache} for every
    patched layer (per row or per query block: Recorder), and {'seconds', 'tokens'} for the pass."""
    recorders = {layer.layer_idx: Recorder(rows, seed, unit) for layer in plugin.layers()}
    record = dense_passes(model, plugin, sequences, recorders)
    caches = {i: r.cache() for i, r in recorders.items()}
    release_freed_memory()
    return caches, record


@torch.no_grad()
def dense_passes(model, plugin, sequences, recorders: dict) -> dict:
    """One dense forward per sequence (1-D token tensors) with each patched layer's recorder set
    (recorders: {layer_idx: callable}, the SparseLayer hook; removed after, also on an error);
    returns {'seconds', 'tokens'} of the pass (collect_teacher, lowrank.calibrate)."""
    layers = plugin.layers()
    dev = next(model.parameters()).device
    start, tokens = time.perf_counter(), 0
    try:
        for layer in layers:
            layer.recorder = recorders[layer.layer_idx]
        with plugin.base_function():
            for ids in sequences:
                model(input_ids=ids.view(1, -1).to(dev), use_cache=False)
                tokens += ids.numel()
    finally:
        for layer in layers:
            layer.recorder = None
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def release_freed_memory() -> None:
    """Give the memory of the freed recorder parts back to the system (glibc keeps freed heap pages of
    mid-sized allocations: without this the 96-sequence teacher held its parts (several GB) beside the
    cache, and the gate training after it was killed for memory). A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_gate(gate, cache: dict, **options) -> dict:
    """train_gates for one layer."""
    return train_gates([gate], [cache], **options)[0]


TARGETS = ("peak", "mass")


def mass_target(cache: dict) -> torch.Tensor:
    """The cache's mass (N, Hkv, nfull) on each row's candidates, normalised to sum 1 (0 without mass)."""
    t = cache["mass"] * cache["cand"][:, None]
    return t / t.sum(-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


def train_gates(gates: list, caches: list[dict], steps: int = 2000, lr: float = 3e-3, batch: int = 256,
                seed: int = 0, holdout: float = 0.1, target: str = "peak") -> list[dict]:
    """Adam on each layer's gate against its own cached rows; the layers are independent (each gate
    sees only its layer's cache), and they train side by side as one batched computation: their
    weights are stacked along a leading layer axis, which the gate's products broadcast over. Each
    step takes `batch` rows of one training sequence (its pooled keys are shared by them); the last
    `holdout` share of the sequences (at least one when there are two or more) is held out. The
    caches must come from one collect_teacher call (the same rows in every layer). target: what the
    gates learn, "peak" (the cache's max-pooled target) or "mass" (mass_target). Returns, per
    layer, the KL(target || gate) on train and held-out rows before and after, and seconds."""
    spans = _sequence_spans(caches[0])
    cut = len(spans) - max(1, round(len(spans) * holdout)) if len(spans) > 1 else len(spans)
    train, held = spans[:cut], spans[cut:]
    if gates[0].reads_quest and "quest" not in caches[0]:
        raise DataError("this teacher cache has no Quest bounds (it was recorded for a gate without gate_quest): "
                        "collect the teacher again with the Quest-reading gate (another teacher file)")
    stack = stack_gates(gates)
    if target not in TARGETS:
        raise ValueError(f"unknown gate target {target!r}; use one of: {', '.join(TARGETS)}")
    cache = {k: _stack(caches, k) for k in ("q", "stats")}
    cache["target"] = torch.stack([c["target"] if target == "peak" else mass_target(c) for c in caches])
    cache.update({k: caches[0][k] for k in ("pos", "seq", "cand", "block") if k in caches[0]})
    if gates[0].reads_quest:
        cache["quest"] = _stack(caches, "quest")
    if "block" in cache:
        batch = max(1, batch // len(cache["block"]))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(stack.parameters(), lr=lr)
    start = time.perf_counter()
    before = {"train": cached_kl(stack, cache, train), "heldout": cached_kl(stack, cache, held)}
    for step in range(steps):
        s, lo, hi = train[int(torch.randint(len(train), (1,), generator=gen))]
        rows = lo + torch.randperm(hi - lo, generator=gen)[:batch]
        loss = gate_kl(cached_scores(stack, cache, s, rows), cache["target"][:, rows], cache["cand"][rows][:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    after = {"train": cached_kl(stack, cache, train), "heldout": cached_kl(stack, cache, held)}
    with torch.no_grad():
        for i, g in enumerate(gates):
            g.wq.copy_(stack.wq[i])
            g.wk.copy_(stack.wk[i])
            if g.reads_quest:
                g.quest_scale.copy_(stack.quest_scale[i])
    return [{"before": {k: v[i] for k, v in before.items()}, "after": {k: v[i] for k, v in after.items()},
             "seconds": seconds / len(gates), "rows": len(cache["pos"]), "steps": steps,
             **({"blocks": len(cache["seq"])} if "block" in cache else {}),
             "train_sequences": len(train), "heldout_sequences": len(held)} for i in range(len(gates))]


def _stack(caches: list[dict], key: str) -> torch.Tensor:
    """The layers' `key` stacked (L, ...); each cache's entry becomes a view of the stack, so the
    layers' own copies are freed and memory holds one copy (the caller's caches stay usable)."""
    stacked = torch.stack([c[key] for c in caches])
    for i, c in enumerate(caches):
        c[key] = stacked[i]
    return stacked


def stack_gates(gates: list):
    """The gates as one BlockGate whose weights are stacked along a leading layer axis (L, ...), which
    its products broadcast over: a copy, trained in place of the L gates (train_gates)."""
    stack = BlockGate.__new__(BlockGate)
    torch.nn.Module.__init__(stack)
    stack.block_size, stack.gate_dim = gates[0].block_size, gates[0].gate_dim
    stack.register_buffer("inv_freq", gates[0].inv_freq.clone(), persistent=False)
    stack.wq = torch.nn.Parameter(torch.stack([g.wq.detach() for g in gates]))      # (L, Hkv, G*D, dg)
    stack.wk = torch.nn.Parameter(torch.stack([g.wk.detach() for g in gates]))      # (L, Hkv, 3D, dg)
    if gates[0].reads_quest:
        stack.quest_scale = torch.nn.Parameter(torch.stack([g.quest_scale.detach() for g in gates]))   # (L, Hkv)
    return stack


def _sequence_spans(cache: dict) -> list[tuple[int, int, int]]:
    """(sequence, first row, end row) of each recorded sequence (rows are stored sequence by sequence)."""
    ids, counts = torch.unique_consecutive(cache["seq"], return_counts=True)
    ends = counts.cumsum(0)
    return [(int(i), int(e - c), int(e)) for i, c, e in zip(ids, counts, ends)]


@torch.no_grad()
def cached_kl(gate, cache: dict, spans) -> list[float]:
    """Per layer, the stacked gate's KL on the rows of the given sequence spans (the mean over rows
    with candidates; nan without rows)."""
    layers = cache["q"].shape[0]
    total, count = torch.zeros(layers), torch.zeros(layers)
    for s, lo, hi in spans:
        rows = torch.arange(lo, hi)
        scores, target = cached_scores(gate, cache, s, rows), cache["target"][:, rows]
        for i in range(layers):
            n = int((target[i].sum(-1) > 0).sum())
            total[i] += gate_kl(scores[i], target[i], cache["cand"][rows][:, None]).item() * n
            count[i] += n
    return [(t / c).item() if c else float("nan") for t, c in zip(total, count)]


def cached_scores(gate, cache: dict, s: int, rows) -> torch.Tensor:
    """(L, N, Hkv, nfull) scores of the stacked gate for cached rows of sequence s (a block cache:
    for N cached query blocks, each the score of its rows' mean gate query, as selection.gate_scores
    pools them at granularity block)."""
    keys = gate.keys(cache["stats"][:, s])                                       # (L, Hkv, nfull, dg)
    bs = len(cache["block"]) if "block" in cache else 1
    units = torch.as_tensor(rows)
    rows = (units[:, None] * bs + torch.arange(bs)).flatten()                    # a block's rows
    qg = gate.queries(cache["q"][:, rows].transpose(1, 2), cache["pos"][rows])  # (L, Hkv, N*bs, dg)
    if bs > 1:
        qg = qg.unflatten(2, (-1, bs)).mean(3)                                  # (L, Hkv, N, dg)
    bound = cache["quest"][:, units].transpose(1, 2) if gate.reads_quest else None   # (L, Hkv, N, nfull)
    return gate.scores(qg, keys, bound).transpose(1, 2)
