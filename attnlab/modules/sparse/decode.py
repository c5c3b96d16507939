"""A decoding step: one query row against the KV cache, reading only the blocks it selected.

The row at position P = Tk - 1 (block i = P // bs) has selected, per kv head (learned) or per
query head (quest), the blocks idx (B, Hkv, S, K) with `valid` (selection.py, row-wise: from the
page store's metadata, pages.py, so nothing is re-pooled). Their key positions
    pos = idx * bs + [0 .. bs)     (K * bs per head; positions > P, i.e. past the end of the
                                    partial last block, and slots that are not real are masked)
are gathered from the cache with one index_select for K and one for V, over a (rows, D) view of
the cache's storage (cache_rows: no copy of the cache, also when the cache hands out a strided view
of a larger buffer, kvcache.GrowingCache), and the G query heads attend to them with one 4-D SDPA:
    S heads share a choice: q (B*Hkv, S, G/S, D) x K (B*Hkv, S, n, D) -> (B, 1, Hq, D).
(4-D, so CPU SDPA takes its flash kernel: a 5-D call falls back to the unfused math path.)
Work per step: Hq * K * bs keys instead of Hq * Tk. Exact: it equals the general kernels on the
same selection (tested against a full recomputation with granularity row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .patterns import Pattern, Selection


_STARTS: dict = {}       # (b, h, row strides, device) -> start (B, H, 1, 1): reused by every step and layer
_OFFSETS: dict = {}      # (bs, device) -> arange(bs)


def cache_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, T, D) -> (rows (N, D), start (B, H, 1, 1)): a view of x's storage as rows of D
    such that x[b, h, t] == rows[start[b, h] + t], without copying x (when its rows are unit-strided
    and evenly spaced, as a contiguous tensor or a [:, :, :T] view of a larger buffer is); else a copy."""
    b, h, t, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 != d or s1 % d or s0 % d:
        x = x.contiguous()
        s0, s1 = h * t * d, t * d
    rows = x.as_strided((((b - 1) * s0 + (h - 1) * s1) // d + t, d), (d, 1), x.storage_offset())
    key = (b, h, s0 // d, s1 // d, x.device)
    start = _STARTS.get(key)
    if start is None:
        if len(_STARTS) > 64:
            _STARTS.clear()
        start = _STARTS[key] = (torch.arange(b, device=x.device) * (s0 // d)).view(b, 1, 1, 1) \
            + (torch.arange(h, device=x.device) * (s1 // d)).view(1, h, 1, 1)
    return rows, start


def _offsets(bs: int, device) -> torch.Tensor:
    key = (bs, device)
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.arange(bs, device=device)
    return _OFFSETS[key]


def decode_attention(q, k, v, p: Pattern, sel: Selection, scale: float) -> tuple[torch.Tensor, int]:
    """q (B, Hq, 1, D), k, v (B, Hkv, Tk, D) -> (B, 1, Hq, D), and the pairs scored."""
    b, hq, _, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    idx = sel.idx[..., 0, :]                                                   # (B|1, Hkv|1, S, K)
    s, kk = idx.shape[2], idx.shape[3]
    krows, kstart = cache_rows(k)
    vrows, vstart = cache_rows(v)
    offsets = _offsets(bs, q.device)
    if sel.whole or (kk >= 3 and bool(sel.valid.all())):
        pos = _whole_block_rows(idx, tk, bs, offsets)
        mask = None
    else:
        valid = sel.valid[..., 0, :]
        pos = (idx[..., None] * bs + offsets).flatten(-2)                     # (B|1, Hkv|1, S, K*bs)
        mask = ((valid[..., None].expand(*valid.shape, bs).flatten(-2)) & (pos < tk)).expand(b, hkv, s, -1)
        mask = mask.reshape(b * hkv, s, 1, -1)
        pos = pos.clamp(max=tk - 1)
    n = pos.shape[-1]
    kpos = (pos + kstart).view(-1)
    kc = krows.index_select(0, kpos).view(b * hkv, s, n, d)
    vpos = kpos if vstart is kstart else (pos + vstart).view(-1)
    vc = vrows.index_select(0, vpos).view(b * hkv, s, n, d)
    out = F.scaled_dot_product_attention(q.reshape(b * hkv, s, hq // hkv // s, d), kc, vc, attn_mask=mask, scale=scale)
    return out.view(b, 1, hq, d), b * hq * n


def _whole_block_rows(idx, tk, bs, offsets):
    """Every slot real (the fixed blocks 0, i-1, i first, as decode_top_k orders them): the cache rows
    (B, Hkv, S, n) of the selected blocks, with the partial last block (when Tk is not a multiple of
    bs; slot 2 is then that block, i = Tk // bs) cut to its Tk % bs real rows, so SDPA needs no mask."""
    partial = tk % bs
    if not partial:
        return (idx[..., None] * bs + offsets).flatten(-2)
    pos = (torch.cat([idx[..., :2], idx[..., 3:]], -1)[..., None] * bs + offsets).flatten(-2)
    return torch.cat([pos, (offsets[:partial] + (tk - partial)).expand(*pos.shape[:-1], partial)], -1)
