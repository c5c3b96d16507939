"""Page metadata: each complete key block's statistics, computed once and kept beside the KV cache.

Quest keeps per page (key block) the elementwise min and max of its keys; the learned gate reads
the max, min and mean of its keys before RoPE (pooling.py). Both depend on that block's keys only,
so with a KV cache they are computed when a block completes and never again: a decoding step then
scores the nfull = Tk // bs blocks from (nfull x D) metadata instead of re-pooling all Tk keys.

The attention function is not handed the Cache object, so the store lives beside it, one per
patched layer (SparseLayer.pages), keyed off the keys it is given:
  - a call whose queries start at position 0 (a prefill, a forward without cache) starts afresh;
  - a later call (queries at qoff > 0: the cache holds the earlier keys) continues the store when it
    matches: same batch, heads, device and dtype, at most as many blocks as now complete, and the
    last key of EVERY stored block equal to the given key at that position (so a different
    sequence, a reordered batch or beam, or a cropped cache is caught and recomputed);
  - otherwise it is rebuilt from the given keys (correct, just not incremental).
What the check cannot see: a cache edited in place (not by appending) so that a block changes
only at positions other than its last, with the block's last key unchanged. From the second layer
on, a key depends on every earlier token, so any earlier change reaches the block's last key; in
the FIRST layer a key depends on its own token and position only, so there such an edit would go
unnoticed. Appending generation (greedy, sampling) never does this; beam search reorders whole
rows, which is caught unless two beams share every block's last token yet differ elsewhere in a
block (then the first layer would reuse the other beam's statistics: a known gap, not tested).
`computed` counts the blocks whose statistics were computed, for tests of "once per block".
Without gradients (decoding), the gate's keys of the stored blocks are kept too, while the gate's
weights are unchanged (their version counters), so a step projects only the newly completed blocks;
for the lowrank indexer (kind "lowrank", no block statistics) the same for its projections k B of
every key of the complete blocks (lowrank_keys).
"""

from __future__ import annotations

import torch

from .gate import unrope
from .patterns import Pattern
from .pooling import key_stats, minmax


class Pages:
    def __init__(self, kind: str, quest: bool = False):
        self.kind = kind                    # "quest": (lo, hi); "learned": stats before RoPE; "lowrank": none
        self.quest = quest and kind == "learned"   # a gate that reads Quest's bound: (stats, lo, hi)
        self.parts: tuple[torch.Tensor, ...] | None = None   # each (B, Hkv, n, E)
        self.probe: torch.Tensor | None = None              # (B, Hkv, n, D): each stored block's last key
        self.n = 0
        self.computed = 0

        self.keys: torch.Tensor | None = None                # (B, Hkv, nk, gate_dim): the gate's keys
        self.keys_of: tuple | None = None                    # (gate, its weights' versions) they belong to

    def reset(self) -> None:
        self.parts, self.probe, self.n = None, None, 0
        self.keys, self.keys_of = None, None

    def gate_keys(self, gate, stats: torch.Tensor) -> torch.Tensor:
        """gate.keys(stats) for the stored blocks' stats; outside autograd, the keys of blocks already
        projected by the same, unchanged gate are reused."""
        if torch.is_grad_enabled():
            return gate.keys(stats)
        owner = (id(gate), gate.wk._version, gate.wk.data_ptr())
        if self.keys is None or self.keys_of != owner or self.keys.shape[2] > stats.shape[2] \
                or self.keys.shape[:2] != stats.shape[:2]:
            self.keys, self.keys_of = gate.keys(stats[:, :, :0]), owner
        done = self.keys.shape[2]
        if stats.shape[2] > done:
            self.keys = torch.cat([self.keys, gate.keys(stats[:, :, done:], first=done)], 2)
        return self.keys

    def lowrank_keys(self, indexer, k: torch.Tensor, p: Pattern) -> torch.Tensor:
        """indexer.project of the complete blocks' keys (B, Hkv, nfull * bs, r); outside autograd the
        projections of blocks already stored (same sequence, same unchanged indexer) are reused."""
        n = p.nfull * p.bs
        if torch.is_grad_enabled():
            return indexer.project(k[:, :, :n])
        self.get(k, p)                                      # a new or changed sequence resets the store
        owner = (id(indexer), indexer.wk._version, indexer.wk.data_ptr())
        if self.keys is None or self.keys_of != owner or self.keys.shape[2] > n or self.keys.shape[:2] != k.shape[:2]:
            self.keys, self.keys_of = indexer.project(k[:, :, :0]), owner
        done = self.keys.shape[2]
        if n > done:
            self.keys = torch.cat([self.keys, indexer.project(k[:, :, done:n])], 2)
        return self.keys

    def _matches(self, k: torch.Tensor, p: Pattern) -> bool:
        if self.n == 0 or p.qoff == 0 or self.n > p.nfull:
            return False
        probe = k[:, :, p.bs - 1:self.n * p.bs:p.bs]
        return (self.probe.shape == probe.shape and self.probe.device == probe.device
                and self.probe.dtype == probe.dtype and torch.equal(self.probe, probe))

    @torch.no_grad()
    def get(self, k: torch.Tensor, p: Pattern, rope=None) -> tuple[torch.Tensor, ...]:
        """The metadata of the nfull complete blocks of k (B, Hkv, Tk, D): (lo, hi) for quest, (stats,)
        for learned ((stats, lo, hi) when its gate reads Quest), each (B, Hkv, nfull, E); only blocks
        not yet in the store are computed."""
        if not self._matches(k, p):
            self.reset()
        probed = self.n                                     # the stored probe holds these blocks' last keys
        if p.nfull > self.n:
            lo, hi = self.n * p.bs, p.nfull * p.bs
            new = k[:, :, lo:hi]
            if self.kind == "quest":
                fresh = minmax(new, p.nfull - self.n, p.bs)
            elif self.kind == "lowrank":
                fresh = ()
            else:
                fresh = (key_stats(unrope(new, torch.arange(lo, hi, device=k.device), rope), p.nfull - self.n, p.bs),)
                if self.quest:
                    fresh += minmax(new, p.nfull - self.n, p.bs)
            self.parts = fresh if self.parts is None else tuple(torch.cat([a, b], 2) for a, b in zip(self.parts, fresh))
            self.computed += p.nfull - self.n
            self.n = p.nfull
        if self.n == 0:
            b, h, _, d = k.shape
            if self.kind == "lowrank":
                return ()
            if self.kind == "quest":
                return tuple(k.new_zeros(b, h, 0, d) for _ in range(2))
            return (k.new_zeros(b, h, 0, 3 * d),) + ((k.new_zeros(b, h, 0, d),) * 2 if self.quest else ())
        if self.n > probed:                                 # only new blocks' last keys are copied
            fresh = k[:, :, probed * p.bs + p.bs - 1:self.n * p.bs:p.bs]
            self.probe = fresh.clone() if probed == 0 else torch.cat([self.probe, fresh], 2)
        return self.parts
