"""Selection: which key blocks each query computes (a patterns.Selection, block indices only).

Two granularities (config `granularity`) for quest, learned and lowrank:
  block  one choice per (query block, kv head), shared by the block's rows and the G query heads of
         the kv head (as SeerAttention, MoBA and NSA choose). The block's queries are pooled
         (pooling.py) and scored against the complete key blocks:
           quest    the box bound over the block's queries (quest.quest_block_scores): an upper bound
                    on every logit between the two blocks;
           learned  the gate's score of the block's mean gate query (its rows' gate queries, each
                    rotated to its own position, averaged): the mean of the rows' scores;
           lowrank  the block's mean query's approximate attention over the keys before the block,
                    summed over the kv head's query heads (lowrank.py): the rows' mean logit
                    exactly, not the mean of the rows' masses.
         Every row of a query block sees the same key blocks, so the kernel computes exactly what it
         selected (blockshared.py): work = density.
  row    each query row chooses from its own query (quest, lowrank: each query head; learned: each kv head).
A decoding step is one row, so it is row-wise by construction, whatever the granularity: cached
generation equals a full recomputation with granularity row (tested), not with block (a block's
choice in a full forward depends on rows that come after the decoded one). Both keep the fixed
blocks 0 (sinks), i-1 and i (the diagonal, causal inside) and choose among the candidates
1 <= j <= i-2 (Pattern.row_selection): top_k, or (learned) mass / threshold. `oracle` ranks by the
dense attention mass itself (per row, or summed over the block's rows).

Key-block metadata comes from the layer's page store (pages.py), so with a KV cache each block's
statistics are computed once.
"""

from __future__ import annotations

import torch

from .config import SparseConfig
from .gate import BlockGate, unrope
from .lowrank import LowRankIndexer
from .pages import Pages
from .patterns import Pattern, Selection
from .pooling import pool_queries
from .quest import quest_block_scores, quest_bound, quest_row_scores
from .teacher import row_block_stats


def per_block(cfg: SparseConfig, p: Pattern) -> bool:
    """Whether this call selects per query block: granularity block, and more than one query row."""
    return cfg.granularity == "block" and p.tq > 1


def real_rows(p: Pattern, base) -> torch.Tensor | None:
    """(B|1, Tq) bool: the query rows that are not padding (their own key is visible), or None."""
    if base is None:
        return None
    r = torch.arange(p.tq, device=base.device)
    return base[:, 0, r, r + p.qoff]


def gate_scores(gate: BlockGate, q, p: Pattern, stats, rope, block: bool, real=None, pages: Pages | None = None,
                bound=None) -> torch.Tensor:
    """The gate's scores (B, Hkv, R, nfull) from q (B, Hq, Tq, D) after RoPE and the complete key
    blocks' stats (B, Hkv, nfull, 3D): per row (R = Tq) or per query block (R = nq, the mean over
    its real rows' gate queries); plus, for a gate that reads Quest, its bound (quest_bound)."""
    gq = gate.queries(unrope(q, p.qpos, rope), p.qpos)                       # (B, Hkv, Tq, gate_dim)
    if block:
        gq = pool_queries(gq, p, "mean", real)                               # (B, Hkv, nq, gate_dim)
    return gate.scores(gq, pages.gate_keys(gate, stats) if pages is not None else gate.keys(stats), bound)


@torch.no_grad()
def select(cfg: SparseConfig, q, k, p: Pattern, base, scale, pages: Pages | None = None,
           gate: BlockGate | None = None, rope=None, indexer: LowRankIndexer | None = None) -> Selection:
    """q (B, Hq, Tq, D), k (B, Hkv, Tk, D) -> the Selection of the config's variant (window, quest,
    learned, lowrank) at this call's granularity."""
    if cfg.variant == "window":
        return p.window_selection()
    b, hq, tq, _ = q.shape
    hkv = k.shape[1]
    block = per_block(cfg, p)
    rows = p.nq if block else tq
    real = real_rows(p, base) if block else None
    if not p.has_candidates:             # too short: only the fixed blocks
        scores = q.new_zeros(b, hkv, 1, rows, p.nfull)
    elif cfg.oracle:                     # the dense attention mass per row and block
        mass = row_block_stats(q, k, p, base, scale)[0][..., :p.nfull].view(b, hkv, hq // hkv, tq, p.nfull)
        if block:
            mass = pool_queries(mass.sum(2), p, "mean", real)[:, :, None]
        elif cfg.variant == "learned":
            mass = mass.sum(2, keepdim=True)
        scores = mass.clamp_min(torch.finfo(mass.dtype).tiny).log()
    elif cfg.variant == "lowrank":
        kp = pages.lowrank_keys(indexer, k, p) if pages is not None else None
        scores = indexer.scores(q, k, p, base, scale, block, real, kp)
    else:
        pages = pages or Pages(cfg.variant, cfg.gate_quest)
        meta = pages.get(k, p, rope)
        if cfg.variant == "quest":
            scores = quest_block_scores(q, *meta, p, real) if block else quest_row_scores(q, *meta)
        else:
            bound = quest_bound(q, *meta[1:], p, block, real, scale) if gate.reads_quest else None
            scores = gate_scores(gate, q, p, meta[0], rope, block, real, pages, bound)[:, :, None]
    if p.tq == 1 and cfg.mass is None and cfg.threshold is None and p.has_candidates:
        return decode_top_k(scores, p, cfg.top_k)
    return p.row_selection(scores, top_k=cfg.top_k, mass=cfg.mass, threshold=cfg.threshold, per_block=block)


def decode_top_k(scores: torch.Tensor, p: Pattern, top_k: int) -> Selection:
    """Pattern.row_selection for one query row with candidates (its block i >= 3), in few operations:
    the candidates are the contiguous blocks 1 .. i-2, so top_k of scores (B, Hkv, S, 1, nfull) there,
    after the fixed blocks 0, i-1, i; every slot is real."""
    i = (p.tk - 1) // p.bs
    top = scores[..., 1:i - 1].topk(min(top_k, i - 2), dim=-1).indices.add_(1)
    fixed = torch.tensor([0, i - 1, i], device=scores.device).expand(*top.shape[:-1], 3)
    idx = torch.cat([fixed, top], -1)
    return Selection(idx, torch.ones_like(idx, dtype=torch.bool), per_block=False, whole=True)
