"""Where the queries sit among the keys, and which key blocks each query row computes.

The attention function receives q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) with Tk >= Tq: the
queries are the LAST Tq of the Tk key positions (a dynamic KV cache), so query r has position
qoff + r with qoff = Tk - Tq. Keys are cut into blocks of `bs` positions; block i holds positions
[i*bs, (i+1)*bs). Patterns are defined on key indices (cache slots); the model's padding/causal mask
is applied on top of every pattern.

A Selection says which key blocks a query row computes, as block indices (never a dense mask):
  per query block (window; learned with granularity: block)
      idx (B|1, Hkv|1, 1, nq, K): every row of query block i (its G query heads too) sees the same blocks;
  per query row (quest; learned with granularity: token)
      idx (B, Hkv, S, Tq, K): row (s, r) sees its own blocks; S = G (each query head chooses) or
      S = 1 (the G query heads of a kv head share the choice).
`valid` marks the real entries (top-k among fewer candidates, a threshold that keeps fewer). Within
the selected blocks the token rule still applies: causal, and for window the band plus the sinks.

Row selections always keep three blocks: block 0 (the sinks), the previous block i-1 and the query's
own block i (causal inside); the selector chooses among the candidates 1 <= j <= i-2, which are
complete and in the past for every query of block i. So a decoding step (Tq = 1, reading the KV
cache) chooses from exactly the keys a full forward chooses from, with the same inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..base import PluginError


@dataclass
class Selection:
    idx: torch.Tensor        # (B|1, Hkv|1, S, R, K) long: key blocks; R = nq (per_block) or Tq
    valid: torch.Tensor      # same shape, bool
    per_block: bool
    whole: bool = False      # every slot real, the fixed blocks 0, i-1, i first (a decoding step's top_k)


class Pattern:
    """Where the queries sit among the keys, in blocks of `bs`. Queries are the last tq of tk keys:
    query r has position qoff + r. Query blocks qb0 .. qb0+nq-1 hold them; nb key blocks hold tk."""

    def __init__(self, tq: int, tk: int, bs: int, device, window: int | None = None, sinks: int = 0):
        self.tq, self.tk, self.bs, self.device = tq, tk, bs, device
        self.qoff = tk - tq
        self.qb0 = self.qoff // bs
        self.nq = (tk - 1) // bs - self.qb0 + 1
        self.nb = (tk + bs - 1) // bs
        self.nfull = tk // bs                       # complete key blocks: the only ones a selector scores
        self.window, self.sinks = window, sinks
        self.has_candidates = (tk - 1) // bs >= 3   # the last row's block i has candidates 1 .. i-2

    # made when first read (a decoding step reads none of them)
    @functools.cached_property
    def qpos(self) -> torch.Tensor:
        """(tq,) the position of each query row."""
        return torch.arange(self.qoff, self.tk, device=self.device)

    @functools.cached_property
    def qblocks(self) -> torch.Tensor:
        """(nq,) the global ids of the query blocks."""
        return torch.arange(self.qb0, self.qb0 + self.nq, device=self.device)

    @functools.cached_property
    def rowblock(self) -> torch.Tensor:
        """(tq,) the block of each query row."""
        return self.qpos // self.bs

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """The token-level rule: causal, and for window the band plus the sinks."""
        ok = kpos <= qpos
        if self.window is not None:
            ok = ok & ((qpos - kpos < self.window) | (kpos < self.sinks))
        return ok

    # -- block selections ---------------------------------------------------------------------------
    def window_selection(self) -> Selection:
        """The key blocks a window query block touches: its band and the sink blocks."""
        i = self.qblocks[:, None]
        j = torch.arange(self.nb, device=self.device)[None]
        lowest = (i * self.bs - self.window + 1).clamp(min=0) // self.bs
        keep = (j >= lowest) & (j <= i)
        keep |= j < (self.sinks + self.bs - 1) // self.bs
        most = -(-(self.window - 1) // self.bs) + 1 + -(-self.sinks // self.bs)
        return selection_from_keep(keep[None, None], most)

    def candidates(self, per_block: bool = False) -> torch.Tensor:
        """(tq, nfull) bool: the blocks a selector chooses from for each query row: 1 <= j <= i-2
        ((nq, nfull) for each query block with per_block)."""
        j = torch.arange(self.nfull, device=self.device)[None]
        i = (self.qblocks if per_block else self.rowblock)[:, None]
        return (j >= 1) & (j <= i - 2)

    def fixed(self, per_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(tq, 3) block indices every row keeps (0, i-1, i) and whether each is real (no duplicates);
        (nq, 3) for each query block with per_block."""
        i = self.qblocks if per_block else self.rowblock
        idx = torch.stack([torch.zeros_like(i), (i - 1).clamp(min=0), i], -1)
        valid = torch.stack([i >= 1, i >= 2, torch.ones_like(i, dtype=torch.bool)], -1)
        return idx, valid

    def row_selection(self, scores: torch.Tensor, top_k: int = 0, mass: float | None = None,
                      threshold: float | None = None, per_block: bool = False) -> Selection:
        """Per-row selection from scores (B, Hkv, S, tq, nfull) over the candidates, plus the three
        fixed blocks: the top_k best; or (mass) the fewest whose softmax probabilities over the
        candidates sum to >= mass; or (threshold) those whose softmax probability is >= threshold.
        per_block: scores (B, Hkv, 1, nq, nfull), one choice per query block."""
        cand = self.candidates(per_block)
        n = int(cand.sum(-1).max()) if self.nfull else 0
        fidx, fvalid = self.fixed(per_block)
        b, hkv, s, r = scores.shape[:4]
        fidx = fidx.expand(b, hkv, s, r, 3)
        fvalid = fvalid.expand(b, hkv, s, r, 3)
        if n == 0:
            return Selection(fidx, fvalid, per_block)
        masked = scores.masked_fill(~cand, -torch.inf)
        if threshold is not None:
            probs = masked.softmax(-1).nan_to_num(0.0)
            keep = probs >= threshold
            k = max(int(keep.sum(-1).max()), 1)
            top = keep.to(torch.uint8).topk(k, dim=-1)
            idx, valid = top.indices, top.values.bool()
        elif mass is None:
            k = min(top_k, n)
            if k == 0:
                return Selection(fidx, fvalid, per_block)
            top = masked.topk(k, dim=-1)
            idx, valid = top.indices, torch.isfinite(top.values)
        else:
            probs, order = masked.softmax(-1).nan_to_num(0.0).sort(-1, descending=True)
            before = probs.cumsum(-1) - probs                    # mass of the better blocks
            keep = (before < mass) & (probs > 0)
            k = max(int(keep.sum(-1).max()), 1)
            idx, valid = order[..., :k], keep[..., :k]
        return Selection(torch.cat([fidx, idx], -1), torch.cat([fvalid, valid], -1), per_block)

    # -- what a selection covers ------------------------------------------------------------------
    def union(self, sel: Selection, qt: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B|1, Hkv|1, nt, U) key blocks each tile of `qt` query positions computes (the union of its
        rows' blocks; qt divides bs, default bs: the query blocks), and whether each is real. U is the
        largest union: padding slots are marked not real."""
        qt = qt or self.bs
        if sel.per_block:
            if qt != self.bs:
                raise ValueError("a selection per query block has tiles of one block")
            return sel.idx[:, :, 0], sel.valid[:, :, 0]
        b, hkv, s, tq, k = sel.idx.shape
        t0, nt = self.qoff // qt, (self.tk - 1) // qt - self.qoff // qt + 1
        front = self.qoff - t0 * qt
        hit = torch.nn.functional.pad(scatter_blocks(sel, self.nb).any(2), (0, 0, front, nt * qt - tq - front))
        keep = hit.view(b, hkv, nt, qt, self.nb).any(3)                                  # (B, Hkv, nt, nb)
        return kept_order(keep, int(keep.sum(-1).max()))

    def row_keep(self, sel: Selection) -> torch.Tensor:
        """(B|1, Hkv|1, S, tq, nb) bool: the blocks of each row. Dense, for references and analysis."""
        keep = scatter_blocks(sel, self.nb)
        if sel.per_block:
            keep = keep[:, :, :, self.rowblock - self.qb0]
        return keep

    def full_mask(self, sel: Selection | None, base: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        """(B|1, Hkv|1, G*tq, tk) bool over the G query heads of each kv head (rows in group_queries'
        order): the pattern (sel=None: dense causal) and the model's mask. Dense: a reference."""
        kpos = torch.arange(self.tk, device=self.device)
        if sel is None:
            ok = (kpos[None] <= self.qpos[:, None])[None, None, None]
        else:
            ok = self.visible(self.qpos[:, None], kpos[None])[None, None, None]
            ok = ok & self.row_keep(sel)[..., kpos // self.bs]
        if base is not None:
            ok = ok & base[:, :, None]
        b, hkv, s = ok.shape[:3]
        return ok.expand(b, hkv, groups if s == 1 else s, self.tq, self.tk).reshape(b, hkv, -1, self.tk)

    def pair_counts(self, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, total) causal (query, key) pairs per query row of the pattern, ignoring padding,
        averaged over batch and heads; kernel-independent."""
        qpos = self.qpos
        total = (qpos + 1).sum().float()
        if self.window is not None:
            kept = torch.minimum(qpos + 1, torch.full_like(qpos, self.window))
            kept = kept + (torch.minimum(torch.full_like(qpos, self.sinks), qpos - self.window + 1)).clamp(min=0)
            return kept.sum().float(), total
        before = ((sel.idx < self.rowblock[:, None] if not sel.per_block else
                   sel.idx < self.qblocks[:, None]) & sel.valid).sum(-1)             # whole blocks before
        if sel.per_block:
            before = before[..., self.rowblock - self.qb0]
        rows = before * self.bs + qpos % self.bs + 1
        return rows.float().sum(-1).mean(), total


def scatter_blocks(sel: Selection, nb: int) -> torch.Tensor:
    """(..., nb) bool: True at each row's real block indices (slots that are not real go to a spare
    column, so they never overwrite a real one)."""
    idx = torch.where(sel.valid, sel.idx, nb)
    out = torch.zeros(*idx.shape[:-1], nb + 1, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, idx, True)[..., :nb]


def selection_from_keep(keep: torch.Tensor, most: int) -> Selection:
    """A per-block Selection from a boolean (B|1, Hkv|1, nq, nb) of kept key blocks."""
    idx, valid = kept_order(keep, min(most, keep.shape[-1]))
    return Selection(idx[:, :, None], valid[:, :, None], per_block=True)


def kept_order(keep: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept key blocks first, `most` per row, and whether each slot is real."""
    most = max(most, 1)
    order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :most]
    return order, keep.gather(-1, order)


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
