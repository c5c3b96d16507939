"""Quest (Tang et al., 2024): training-free, query-aware selection of key blocks.

For key block j keep the elementwise minimum m_j and maximum M_j of its keys (post-RoPE, as the
attention uses them; pooling.minmax, kept per complete block in the page store, pages.py). For any
key k in the block and a query q,

    q . k = sum_d q_d k_d <= sum_d max(q_d m_jd, q_d M_jd) = relu(q) . M_j - relu(-q) . m_j =: u(q, j)

(each term is linear in k_d, so it is largest at an end of [m_jd, M_jd]). u is an upper bound on
every logit of the block, and it is tight when the block holds one key.

Per row (granularity: row): each query row (every query head separately) keeps the top_k candidate
blocks by u plus the fixed ones (sinks, local): it needs only itself and the complete blocks before
its own, so a decoding step with the KV cache selects exactly what the full forward selects. Cost:
two (rows x D) @ (D x blocks) products.

Per query block (granularity: block): the queries of block i lie in the box [b, a] (elementwise
min and max over its rows, pooling.pool_queries), and q_d k_d is bilinear, so over the box x box
each term is largest at one of the four corners:

    u(i, j) = max_g sum_d max(a_d M_jd, a_d m_jd, b_d M_jd, b_d m_jd)     (g: the G query heads)

an upper bound on every logit between a query of block i (any head of the kv head) and a key of
block j. Cost: O(nq * nfull * D) elementwise, in chunks.
"""

from __future__ import annotations

import torch

from .patterns import Pattern
from .pooling import minmax, pool_queries

QUEST_CHUNK = 2**17      # elements of the (query blocks x key blocks x D) box-bound transient (cache-sized)


def quest_row_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """q (B, Hq, Tq, D), key-block min/max lo, hi (B, Hkv, nfull, D) -> u (B, Hkv, G, Tq, nfull)."""
    b, hq, tq, d = q.shape
    hkv = lo.shape[1]
    qg = q.reshape(b, hkv, hq // hkv * tq, d)        # the G heads' rows share their kv head's blocks
    u = torch.baddbmm(qg.clamp(max=0).flatten(0, 1) @ lo.flatten(0, 1).transpose(-1, -2),
                      qg.clamp(min=0).flatten(0, 1), hi.flatten(0, 1).transpose(-1, -2))
    return u.view(b, hkv, hq // hkv, tq, -1)


def quest_scores(q: torch.Tensor, k: torch.Tensor, p: Pattern) -> torch.Tensor:
    """q (B, Hq, Tq, D), k (B, Hkv, Tk, D) -> u (B, Hkv, G, Tq, nfull): the bound per row and block."""
    return quest_row_scores(q, *minmax(k, p.nfull, p.bs))


def quest_block_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: Pattern, real=None) -> torch.Tensor:
    """q (B, Hq, Tq, D), lo, hi (B, Hkv, nfull, D) -> u (B, Hkv, 1, nq, nfull): the bound per
    query block and key block, over every real row (real (B|1, Tq): not padding) and query head."""
    b, hq, tq, d = q.shape
    hkv, nfull = lo.shape[1], lo.shape[2]
    g = hq // hkv
    qa = pool_queries(q, p, "max", real).view(b, hkv, g, p.nq, 1, d)
    qb = pool_queries(q, p, "min", real).view(b, hkv, g, p.nq, 1, d)
    lo, hi = lo[:, :, None, None], hi[:, :, None, None]                          # (B, Hkv, 1, 1, nfull, D)
    out = q.new_zeros(b, hkv, 1, p.nq, nfull)          # only candidates (j <= i-2) are computed and read
    step = max(1, QUEST_CHUNK // max(1, b * hq * nfull * d))
    for i0 in range(0, p.nq, step):
        i1 = min(p.nq, i0 + step)
        j1 = min(nfull, p.qb0 + i1 - 2)
        if j1 <= 0:
            continue
        a, c = qa[:, :, :, i0:i1], qb[:, :, :, i0:i1]
        h, m = hi[..., :j1, :], lo[..., :j1, :]
        top = torch.maximum(torch.maximum(a * h, a * m), torch.maximum(c * h, c * m)).sum(-1)
        out[:, :, 0, i0:i1, :j1] = top.amax(2)
    return out


def quest_bound(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: Pattern, block: bool, real, scale: float):
    """What a gate that reads Quest adds its multiple of (gate.py: gate_quest), in logits (B, Hkv, R,
    nfull): per row the max of u over the kv head's G query heads (R = Tq), or per query block the
    box bound over its rows and heads (R = nq). The selection and the cached teacher both call it."""
    u = quest_block_scores(q, lo, hi, p, real)[:, :, 0] if block else quest_row_scores(q, lo, hi).amax(2)
    return u * scale
