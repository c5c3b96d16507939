"""Pooling: what a selector reads of a block of keys or a block of queries.

Key blocks (complete blocks only; block j holds positions [j*bs, (j+1)*bs)):
    minmax(k)      m_j, M_j = elementwise min and max of the block's keys (post-RoPE): Quest's
                   page metadata (quest.py);
    key_stats(k)   [max_j; min_j; mean_j] of the block's keys (pre-RoPE): what the learned gate
                   reads (gate.py).
Query blocks (the query rows of query block i, pattern.qb0 + i, only the rows present in Tq):
    pool_queries(x, p, "mean")   the mean row (the learned gate's pooled query: since the gate's
                                 score is linear in its query, the pooled query's score is the mean
                                 of the rows' scores);
    pool_queries(x, p, "min"/"max")  the elementwise box of the rows (Quest's block bound).
All are O(T * D): nothing (T x T) and nothing (T x blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .patterns import Pattern


def blocks_of(k: torch.Tensor, nfull: int, bs: int) -> torch.Tensor:
    """k (B, H, Tk, D) -> (B, H, nfull, bs, D): the complete key blocks (a view)."""
    b, h, _, d = k.shape
    return k[:, :, :nfull * bs].reshape(b, h, nfull, bs, d)


def minmax(k: torch.Tensor, nfull: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k (B, Hkv, Tk, D) -> m, M (B, Hkv, nfull, D): elementwise min and max of each complete block."""
    blocks = blocks_of(k, nfull, bs)
    return blocks.amin(3), blocks.amax(3)


def key_stats(k: torch.Tensor, nfull: int, bs: int) -> torch.Tensor:
    """k (B, Hkv, Tk, D) -> (B, Hkv, nfull, 3D): max, min and mean of each complete block."""
    blocks = blocks_of(k, nfull, bs)
    return torch.cat([blocks.amax(3), blocks.amin(3), blocks.mean(3)], -1)


def pool_queries(x: torch.Tensor, p: Pattern, how: str, real: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, H, Tq, E) per query row -> (B, H, nq, E) per query block: the mean, min or max over
    the block's rows that are present (the first and last query blocks may be partial) and real
    (real (B|1, Tq) bool: not padding; None: all). A block without any such row pools to 0."""
    b, h, tq, e = x.shape
    front = p.qoff - p.qb0 * p.bs
    back = p.nq * p.bs - front - tq
    fill = {"mean": 0.0, "min": torch.inf, "max": -torch.inf}[how]
    ok = torch.ones(1, tq, dtype=torch.bool, device=x.device) if real is None else real
    ok = F.pad(ok, (front, back), value=False).view(ok.shape[0], 1, p.nq, p.bs, 1)
    rows = F.pad(x, (0, 0, front, back)).view(b, h, p.nq, p.bs, e)
    if real is not None or how != "mean":
        rows = rows.masked_fill(~ok, fill)
    if how == "mean":
        return rows.sum(3) / ok.sum(3).clamp_min(1)
    pooled = rows.amin(3) if how == "min" else rows.amax(3)
    return pooled.masked_fill(~ok.any(3), 0.0)
