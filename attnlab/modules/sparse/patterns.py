"""Where the queries sit among the keys, and which (query, key) pairs a pattern keeps.

The attention function receives q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) with Tk >= Tq: the
queries are the LAST Tq of the Tk key positions (a dynamic KV cache). Patterns are defined on key
indices (cache slots), in blocks of `block_size` keys; the model's padding/causal mask is applied on
top of every pattern.
"""

from __future__ import annotations

import torch

from ..base import PluginError

class Pattern:
    """Where the queries sit among the keys, in blocks of `bs`. Queries are the last tq of tk keys:
    query r has position qoff + r. Query blocks qb0 .. qb0+nq-1 hold them; nb key blocks hold tk."""

    def __init__(self, tq: int, tk: int, bs: int, device, window: int | None = None, sinks: int = 0):
        self.tq, self.tk, self.bs, self.device = tq, tk, bs, device
        self.qoff = tk - tq
        self.qb0 = self.qoff // bs
        self.nq = (tk - 1) // bs - self.qb0 + 1
        self.nb = (tk + bs - 1) // bs
        self.nfull = tk // bs                       # complete key blocks: the only ones the gate pools
        self.window, self.sinks = window, sinks
        self.qpos = torch.arange(self.qoff, tk, device=device)
        self.qblocks = torch.arange(self.qb0, self.qb0 + self.nq, device=device)   # global ids

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """The token-level rule: causal, and for window the band plus the sinks."""
        ok = kpos <= qpos
        if self.window is not None:
            ok = ok & ((qpos - kpos < self.window) | (kpos < self.sinks))
        return ok

    def window_keep(self) -> torch.Tensor:
        """(1, 1, nq, nb): the key blocks a window query block touches (its band and the sinks)."""
        i = self.qblocks[:, None]
        j = torch.arange(self.nb, device=self.device)[None]
        lowest = (i * self.bs - self.window + 1).clamp(min=0) // self.bs
        keep = (j >= lowest) & (j <= i)
        keep |= j < (self.sinks + self.bs - 1) // self.bs
        return keep[None, None]

    def fixed_keep(self) -> torch.Tensor:
        """(nq, nb): the blocks learned attention always keeps: diagonal, previous, first."""
        i = self.qblocks[:, None]
        j = torch.arange(self.nb, device=self.device)[None]
        return (j == i) | (j == i - 1) | (j == 0)

    def candidates(self) -> torch.Tensor:
        """(nq, nfull): the blocks the gate scores for each query block: 1 <= j <= i-2."""
        i = self.qblocks[:, None]
        j = torch.arange(self.nfull, device=self.device)[None]
        return (j >= 1) & (j <= i - 2)

    def full_mask(self, keep: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
        """(B|1, Hkv|1, tq, tk) bool: the pattern (keep=None: dense causal) and the model's mask."""
        kpos = torch.arange(self.tk, device=self.device)
        ok = self.visible(self.qpos[:, None], kpos[None]) if keep is not None else kpos[None] <= self.qpos[:, None]
        ok = ok[None, None]
        if keep is not None:
            ok = ok & keep[:, :, self.qpos // self.bs - self.qb0][:, :, :, kpos // self.bs]
        if base is not None:
            ok = ok & base
        return ok

    def pair_counts(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, total) causal (query, key) pairs of the pattern, ignoring padding; kernel-independent."""
        qpos = self.qpos
        total = (qpos + 1).sum().float()
        if self.window is not None:
            kept = torch.minimum(qpos + 1, torch.full_like(qpos, self.window))
            kept = kept + (torch.minimum(torch.full_like(qpos, self.sinks), qpos - self.window + 1)).clamp(min=0)
            return kept.sum().float(), total
        j = torch.arange(self.nb, device=self.device)
        before = (keep & (j < self.qblocks[:, None])).sum(-1)                # (B, Hkv, nq) whole blocks
        rows = before[..., qpos // self.bs - self.qb0] * self.bs + qpos % self.bs + 1
        return rows.sum(-1).float().mean(), total


def normalise_mask(query, key, value, attention_mask):
    """The model's mask as (B|1, 1, Tq, Tk) bool (True = may attend), or None for plain causal.
    Mirrors the SDPA integration: with no mask and more keys than queries (a static cache's
    prefill), the queries are the first slots, so the keys are cut to them."""
    tq, tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        if 1 < tq < tk:
            key, value = key[:, :, :tq], value[:, :, :tq]
        return key, value, None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise PluginError(f"SparseAttention expects a (B, 1, Tq, Tk) attention mask, got shape "
                          f"{tuple(attention_mask.shape)}; pass a 2D padding mask and let the model build it")
    mask = attention_mask[..., -tq:, :tk]
    if mask.dtype != torch.bool:   # additive float mask (eager): 0 where visible, a large negative elsewhere
        mask = mask > torch.finfo(mask.dtype).min / 2
    return key, value, mask
