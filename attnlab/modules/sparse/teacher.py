"""The dense teacher: the softmax the sparse patterns approximate, and its block-pooled mass."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels import group_mask, group_queries
from .patterns import Pattern

TEACHER_ROWS = 256   # query rows per chunk of the teacher's dense attention (memory ~ rows * Tk)


def dense_probs(q, k, allowed, scale):
    """(B, Hq, Tq, Tk) softmax probabilities under a boolean mask; rows with no visible key are 0."""
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    s = (group_queries(q, hkv) @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~group_mask(allowed, b, hkv, hq // hkv), -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0).view(b, hq, tq, tk)


@torch.no_grad()
def teacher_block_mass(q, k, p: Pattern, base, scale) -> torch.Tensor:
    """(B, Hkv, nq, nb): the dense attention mass each query block (its real rows and the G query
    heads of a kv head) puts on each key block. Chunked over query blocks: memory ~ TEACHER_ROWS * Tk."""
    b, hq, tq, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    g = hq // hkv
    mass = q.new_zeros(b, hkv, p.nq, p.nb)
    step = max(1, TEACHER_ROWS // (bs * g))
    kpos = torch.arange(tk, device=q.device)
    for c0 in range(0, p.nq, step):
        c1 = min(p.nq, c0 + step)
        lo, hi = max((p.qb0 + c0) * bs, p.qoff), min((p.qb0 + c1) * bs, tk)   # real query positions
        if (p.qb0 + c1 - 1) < 3 or lo >= hi:
            continue                                                         # no candidates yet
        rows = torch.arange(lo, hi, device=q.device)
        allowed = (kpos[None] <= rows[:, None])[None, None]
        if base is not None:   # a padding query (its own key is masked everywhere) teaches nothing
            real = base[:, 0].any(1)[:, rows]
            allowed = allowed & base[:, :, rows - p.qoff] & real[:, None, :, None]
        probs = dense_probs(q[:, :, rows - p.qoff], k, allowed, scale)       # (B, Hq, rows, Tk)
        blocks = F.pad(probs, (0, p.nb * bs - tk)).view(b, hkv, g, len(rows), p.nb, bs).sum((2, 5))
        mass.index_add_(2, rows // bs - p.qb0, blocks)
    return mass
