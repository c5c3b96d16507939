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
Then each layer's gate trains for `steps` Adam steps on minibatches of its rows (gate.gate_kl).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .gate import gate_kl, key_stats, unrope
from .patterns import Pattern

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

class Recorder:
    """Set on a SparseLayer while the dense teacher runs: stores what the layer's gate needs."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed = rows, seed
        self.parts: list[dict] = []

    def __call__(self, layer, q, k, base, scale, p: Pattern):
        if p.qoff or q.shape[0] != 1:
            raise ValueError("the cached teacher records one full sequence at a time (batch 1, no KV cache)")
        cand = p.candidates()
        have = torch.nonzero(cand.any(-1)).flatten()
        if len(have) == 0:
            return
        gen = torch.Generator().manual_seed(self.seed * 100003 + len(self.parts))
        rows = have[torch.randperm(len(have), generator=gen)[:self.rows].to(have.device)].sort().values
        mass, peak = row_block_stats(q, k, p, base, scale, rows)
        hkv = k.shape[1]
        g = q.shape[1] // hkv
        kpre = unrope(k, torch.arange(p.tk, device=k.device), layer.rope)
        self.parts.append({
            "q": unrope(q[:, :, rows], rows + p.qoff, layer.rope)[0].transpose(0, 1).contiguous(),
            "pos": rows + p.qoff,
            "stats": key_stats(kpre, p.nfull, p.bs)[0],
            "target": gate_target(peak, hkv, cand[rows])[0].transpose(0, 1).contiguous(),
            "mass": mass.view(1, hkv, g, len(rows), p.nb).sum(2)[0, :, :, :p.nfull].transpose(0, 1).contiguous(),
            "cand": cand[rows],
        })

    def cache(self) -> dict:
        """The parts of every recorded sequence as one cache (stats padded to the longest sequence)."""
        if not self.parts:
            raise ValueError("nothing was recorded: the sequences are too short to have candidate blocks "
                             "(need more than 3 blocks)")
        nfull = max(part["stats"].shape[1] for part in self.parts)

        def pad(x, dim):   # to nfull blocks along `dim`
            return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, nfull - x.shape[dim]])

        return {"q": torch.cat([part["q"] for part in self.parts]),
                "pos": torch.cat([part["pos"] for part in self.parts]),
                "seq": torch.cat([torch.full_like(part["pos"], i) for i, part in enumerate(self.parts)]),
                "stats": torch.stack([pad(part["stats"], 1) for part in self.parts]),
                "target": torch.cat([pad(part["target"], 2) for part in self.parts]),
                "mass": torch.cat([pad(part["mass"], 2) for part in self.parts]),
                "cand": torch.cat([pad(part["cand"], 1) for part in self.parts])}


@torch.no_grad()
def collect_teacher(model, plugin, sequences, rows: int = 512, seed: int = 0) -> tuple[dict[int, dict], dict]:
    """One dense forward per sequence (1-D token tensors); returns {layer_idx: cache} for every
    patched layer, and {'seconds', 'tokens'} for the teacher pass."""
    layers = plugin.layers()
    recorders = {layer.layer_idx: Recorder(rows, seed) for layer in layers}
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
    return ({i: r.cache() for i, r in recorders.items()},
            {"seconds": time.perf_counter() - start, "tokens": tokens})


def train_gate(gate, cache: dict, steps: int = 2000, lr: float = 3e-3, batch: int = 256, seed: int = 0,
               holdout: float = 0.1) -> dict:
    """Adam on one layer's gate against its cached rows; the last `holdout` share of the rows (by
    sequence order) is held out. Returns the train/held-out KL before and after, and seconds."""
    n = len(cache["pos"])
    cut = max(1, int(n * (1 - holdout))) if n > 1 else n
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    start = time.perf_counter()
    before = {"train": cached_kl(gate, cache, slice(0, cut)), "heldout": cached_kl(gate, cache, slice(cut, n))}
    for step in range(steps):
        idx = torch.randint(0, cut, (min(batch, cut),), generator=gen)
        loss = cached_kl(gate, cache, idx, grad=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    after = {"train": cached_kl(gate, cache, slice(0, cut)), "heldout": cached_kl(gate, cache, slice(cut, n))}
    return {"before": before, "after": after, "seconds": seconds, "rows": n, "steps": steps}


def cached_kl(gate, cache: dict, idx, grad: bool = False):
    """The gate's KL on cached rows idx (a differentiable tensor with grad=True; else a float, the
    mean over rows that have candidates, in chunks)."""
    if grad:
        return gate_kl(cached_scores(gate, cache, idx), cache["target"][idx], cache["cand"][idx][:, None])
    idx = torch.arange(len(cache["pos"]))[idx]
    total, rows = 0.0, 0
    with torch.no_grad():
        for c0 in range(0, len(idx), 1024):
            part = idx[c0:c0 + 1024]
            n = int((cache["target"][part].sum(-1) > 0).sum())
            total += gate_kl(cached_scores(gate, cache, part), cache["target"][part], cache["cand"][part][:, None]).item() * n
            rows += n
    return total / rows if rows else float("nan")


def cached_scores(gate, cache: dict, idx):
    """(N, Hkv, nfull) gate scores of cached rows idx."""
    q, pos, seq = cache["q"][idx], cache["pos"][idx], cache["seq"][idx]
    keys = gate.keys(cache["stats"])                                             # (S, Hkv, nfull, dg)
    qg = gate.queries(q.transpose(0, 1)[None], pos)[0]                          # (Hkv, N, dg) at each position
    return (qg.transpose(0, 1)[:, :, None] @ keys[seq].transpose(-1, -2)).squeeze(2) / math.sqrt(gate.gate_dim)
