"""Quest (Tang et al., 2024): training-free, query-aware selection of key blocks.

For key block j keep the elementwise minimum m_j and maximum M_j of its keys (post-RoPE, as the
attention uses them). For any key k in the block and a query q,

    q . k = sum_d q_d k_d <= sum_d max(q_d m_jd, q_d M_jd) = relu(q) . M_j - relu(-q) . m_j =: u(q, j)

(each term is linear in k_d, so it is largest at an end of [m_jd, M_jd]). u is an upper bound on
every logit of the block, and it is tight when the block holds one key. Each query row (every query
head separately) keeps the top_k candidate blocks by u plus the fixed ones (sinks, local): it needs
only itself and the complete blocks before its own, so a decoding step with the KV cache selects
exactly what the full forward selects. Cost: two (rows x D) @ (D x blocks) products.
"""

from __future__ import annotations

import torch

from .patterns import Pattern


def quest_scores(q: torch.Tensor, k: torch.Tensor, p: Pattern) -> torch.Tensor:
    """q (B, Hq, Tq, D), k (B, Hkv, Tk, D) -> u (B, Hkv, G, Tq, nfull): the bound per row and block."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    blocks = k[:, :, :p.nfull * p.bs].reshape(b, hkv, p.nfull, p.bs, d)
    lo, hi = blocks.amin(3), blocks.amax(3)                                     # (B, Hkv, nfull, D)
    qg = q.view(b, hkv, hq // hkv, tq, d)
    return qg.clamp(min=0) @ hi[:, :, None].transpose(-1, -2) + qg.clamp(max=0) @ lo[:, :, None].transpose(-1, -2)
