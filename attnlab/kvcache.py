"""A KV cache that appends in place: GrowingCache, a transformers DynamicCache whose layers keep
their keys and values in buffers with room to grow.

Why: transformers' DynamicLayer appends a token with torch.cat, so every decoding step copies each
layer's whole K and V (B x Hkv x T x D, twice): O(T) memory traffic per layer per token, which a
sparse attention that reads k of T/bs blocks cannot avoid and which costs as much as dense decode
attention itself reads. A GrowingLayer instead holds buffers of capacity C >= T and writes the new
tokens into positions T .. T+t-1; what it hands to the attention is the view buffer[:, :, :T+t]
(rows unit-strided, heads C*D apart: decode.cache_rows reads it without a copy; SDPA takes it as is).
When the buffer is full it is reallocated with capacity (T+t) * GROWTH + SLACK and the T tokens
copied once, so appending costs O(t) amortised (O(T) every ~T/4 tokens, not every token).

Everything else is DynamicLayer's (get_seq_length, masks, offloading, beam reordering): a method
that replaces `keys`/`values` with new tensors (reorder_cache, batch_select_indices, ...) is seen at
the next update (`keys` is no longer the view this layer handed out) and its tensors are adopted
into a fresh buffer. crop(-n) only moves the end (the next update overwrites those positions in
place: a view handed out before the crop then sees the new tokens; appending generation never
reads one). The first update of an empty layer (a prefill) returns its own contiguous tensors.
With autograd recording (a key that requires grad) it appends with torch.cat, as DynamicLayer
does, since an in-place write would change a tensor saved for the backward.

Which generation uses it: `generation_cache(model)`: a GrowingCache when a sparse plug-in is
attached (attnlab generate, eval --generate), else None (transformers' default).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

GROWTH = 1.25     # capacity after a reallocation, per token held
SLACK = 64        # and this many tokens more


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.kbuf = self.vbuf = self.handed = None
        self.n = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self.kbuf = self.vbuf = self.handed = None
            return super().update(key_states, value_states)
        if self.keys is not self.handed:       # new, or replaced by an inherited method: adopt it
            self._adopt()
        n, t = self.n, key_states.shape[-2]
        if self.kbuf is None or n + t > self.kbuf.shape[-2] or self.kbuf.shape[:2] != key_states.shape[:2] \
                or self.kbuf.shape[-1] != key_states.shape[-1] or self.kbuf.dtype != key_states.dtype \
                or self.kbuf.device != key_states.device or self.vbuf.shape[-1] != value_states.shape[-1]:
            self._grow(n + t, key_states, value_states)
        self.kbuf[:, :, n:n + t].copy_(key_states)
        self.vbuf[:, :, n:n + t].copy_(value_states)
        self.n = n + t
        self._hand_out()
        if n == 0:
            return key_states, value_states
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and self.kbuf is not None and self.keys is self.handed and tokens_to_remove < 0:
            self.n = max(0, self.n + tokens_to_remove)
            self._hand_out()
            return
        super().crop(tokens_to_remove)

    def _hand_out(self) -> None:
        self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]
        self.handed = self.keys

    def _adopt(self) -> None:
        """Take over whatever `keys`/`values` hold now (empty after lazy initialisation)."""
        keys, values = self.keys, self.values
        self.kbuf = self.vbuf = None
        self.n = 0
        if keys is not None and keys.dim() == 4 and keys.shape[-2] > 0:
            self._grow(keys.shape[-2], keys, values, keep=(keys, values))
            self.n = keys.shape[-2]

    def _grow(self, need: int, like_k: torch.Tensor, like_v: torch.Tensor, keep=None) -> None:
        """New buffers with room for `need` tokens and more, holding the first n tokens of the old ones
        (or of `keep`)."""
        cap = int(need * GROWTH) + SLACK
        b, h, _, d = like_k.shape
        kbuf = like_k.new_empty(b, h, cap, d)
        vbuf = like_v.new_empty(b, h, cap, like_v.shape[-1])
        old = keep or ((self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]) if self.kbuf is not None else None)
        if old is not None and old[0].shape[-2] > 0:
            if old[0].shape[:2] != (b, h):
                raise ValueError(f"GrowingCache: {tuple(like_k.shape)} keys appended to a cache of "
                                 f"{tuple(old[0].shape)}; reorder or crop the cache through its methods")
            kbuf[:, :, :old[0].shape[-2]].copy_(old[0])
            vbuf[:, :, :old[1].shape[-2]].copy_(old[1])
        self.kbuf, self.vbuf = kbuf, vbuf


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (one per attention layer, created at its first update)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def generation_cache(model) -> GrowingCache | None:
    """The cache generation should start with: a GrowingCache when a sparse plug-in is attached to
    the model (its decode steps read a few blocks, so the append is what is left to save), else None."""
    from .modules.sparse.layer import ATTR
    return GrowingCache() if any(hasattr(m, ATTR) for m in model.modules()) else None
