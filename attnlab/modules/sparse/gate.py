"""The learned block gate (variant: learned), after SeerAttention-R's decoding gate and NSA.

Per layer and kv head h, a query row at position p scores complete key block j as

    s_h(p, j) = < R_p Wq_h [q_{h,1}; ...; q_{h,G}],  R_{j*bs} Wk_h [max_j; min_j; mean_j] > / sqrt(gate_dim)

  - q_{h,g}: the row's query of the G query heads that share kv head h, BEFORE the rotary embedding
    (the attention function receives them rotated; rotating back by -p is exact: R_p is orthogonal);
  - max_j, min_j, mean_j: elementwise max, min and mean of block j's keys, also before RoPE (pooling
    rotated keys mixes vectors turned by different angles, which washes out the high frequencies);
  - Wq_h (G*D -> gate_dim), Wk_h (3*D -> gate_dim): one pair per kv head (not shared by the heads);
  - R_x: a rotary embedding of the gate_dim vectors at position x (the row's own position, the start
    of the block), so the gate sees how far back a block is.
The selection is per row and shared by the G query heads of the kv head (the kernel's unit).

With `gate_quest`, the score also reads Quest's bound (quest.py) of the row's G heads, in logits:

    s_h(p, j) + a_h * scale * max_g u(q_{h,g}, j),        a_h learned per kv head, starting at 1

so the gate starts as Quest plus a small learned term and training can only move it where the
teacher says Quest ranks wrongly (the bound sees the exact post-RoPE query against the block's
key box; the learned part sees the keys' mean and where the block lies).

What it learns from (SeerAttention-R): the dense model's attention of the same row, max-pooled over
each key block and over the G heads, restricted to the candidate blocks and normalised to sum 1:
    t(p, j) = max_{g, x in block j} A_g(p, x) / sum_j' (same)
and the loss is KL(t || softmax_j s(p, .)) over the candidates. A top-k or threshold choice then
uses s. Layer by layer from a cached teacher (teacher.py), or online through gate_loss().
"""

from __future__ import annotations

import math

import torch
from torch import nn


POOLS = 3   # max, min, mean


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Rotate x (..., R, E) by the angles pos (R,) * inv_freq (E/2,), or back with sign=-1."""
    angle = pos.to(inv_freq.dtype)[:, None] * inv_freq[None]
    emb = torch.cat((angle, angle), -1).to(x.dtype)
    return x * emb.cos() + sign * rotate_half(x) * emb.sin()


def unrope(x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """The model's q or k (B, H, R, D) at positions pos (R,) as they were before its rotary embedding
    (rope = (inv_freq, attention_scaling); None: the model has no rotary embedding)."""
    if rope is None:
        return x
    inv_freq, scaling = rope
    return rotary(x, pos, inv_freq.to(x.device), sign=-1.0) / scaling


class BlockGate(nn.Module):
    def __init__(self, head_dim: int, hkv: int, groups: int, gate_dim: int, block_size: int, seed: int,
                 theta: float = 10000.0, quest: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.wq = nn.Parameter(torch.randn(hkv, groups * head_dim, gate_dim, generator=gen) / math.sqrt(groups * head_dim))
        self.wk = nn.Parameter(torch.randn(hkv, POOLS * head_dim, gate_dim, generator=gen) / math.sqrt(POOLS * head_dim))
        if quest:
            self.quest_scale = nn.Parameter(torch.ones(hkv))
        self.block_size, self.gate_dim = block_size, gate_dim
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, gate_dim, 2).float() / gate_dim),
                             persistent=False)

    def queries(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, R, D) before RoPE at positions pos (R,) -> (B, Hkv, R, gate_dim)."""
        b, hq, r, d = q.shape
        hkv = self.wq.shape[-3]
        rows = q.view(b, hkv, hq // hkv, r, d).transpose(2, 3).reshape(b, hkv, r, -1)   # heads side by side
        return rotary(rows @ self.wq, pos, self.inv_freq)

    def keys(self, stats: torch.Tensor, first: int = 0) -> torch.Tensor:
        """stats (B, Hkv, n, 3D) of blocks first .. first+n-1 -> (B, Hkv, n, gate_dim), rotated to
        each block's start."""
        pos = torch.arange(first, first + stats.shape[2], device=stats.device) * self.block_size
        return rotary(stats @ self.wk, pos, self.inv_freq)

    @property
    def reads_quest(self) -> bool:
        return hasattr(self, "quest_scale")

    def scores(self, qg: torch.Tensor, kg: torch.Tensor, bound: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Hkv, R, gate_dim) x (B, Hkv, nfull, gate_dim) -> (B, Hkv, R, nfull); a gate that reads
        Quest adds quest_scale x bound (B, Hkv, R, nfull), Quest's bound in logits."""
        s = qg @ kg.transpose(-1, -2) / math.sqrt(self.gate_dim)
        if self.reads_quest:
            if bound is None:
                raise ValueError("this gate reads Quest's bound (gate_quest): pass it")
            s = s + self.quest_scale[..., None, None] * bound
        return s


def gate_kl(scores: torch.Tensor, target: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Mean over rows with candidates of KL(target || softmax over the candidates of scores).
    scores, target (..., R, nfull), cand (R, nfull) or broadcastable; target rows sum to 1 or 0.
    Taken in fp32 whatever the base's dtype (-1e9 does not even fit in fp16)."""
    scores, target = scores.float(), target.float()
    log_gate = scores.masked_fill(~cand, -1e9).log_softmax(-1).masked_fill(~cand, 0.0)
    rows = target.sum(-1) > 0
    kl = (torch.xlogy(target, target) - target * log_gate).sum(-1)
    return (kl * rows).sum() / rows.sum().clamp_min(1)
