"""A decoding step: one query row against the KV cache, reading only the blocks it selected.

The row at position P = Tk - 1 (block i = P // bs) has selected, per kv head (learned) or per
query head (quest), the blocks idx (B, Hkv, S, K) with `valid` (selection.py, row-wise: from the
page store's metadata, pages.py, so nothing is re-pooled). Their key positions
    pos = idx * bs + [0 .. bs)     (K * bs per head; positions > P, i.e. past the end of the
                                    partial last block, and slots that are not real are masked)
are gathered from the cache (one index_select on the flattened (B * Hkv * Tk, D) keys and values)
and the G query heads attend to them with SDPA:
    S heads share a choice: q (B, Hkv, S, G/S, D) x K (B, Hkv, S, K*bs, D) -> (B, 1, Hq, D).
Work per step: Hq * K * bs keys instead of Hq * Tk. Exact: it equals the general kernels on the
same selection (tested against a full recomputation with granularity row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .patterns import Pattern, Selection


def decode_attention(q, k, v, p: Pattern, sel: Selection, scale: float) -> tuple[torch.Tensor, int]:
    """q (B, Hq, 1, D), k, v (B, Hkv, Tk, D) -> (B, 1, Hq, D), and the pairs scored."""
    b, hq, _, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    idx, valid = sel.idx[..., 0, :], sel.valid[..., 0, :]                   # (B|1, Hkv|1, S, K)
    s, kk = idx.shape[2], idx.shape[3]
    idx, valid = idx.expand(b, hkv, s, kk), valid.expand(b, hkv, s, kk)
    if kk >= 3 and bool(valid.all()):
        return _whole_blocks(q, k, v, p, idx, scale), b * hq * (kk * bs - (-tk % bs))
    pos = (idx[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)   # (B, Hkv, S, K*bs)
    ok = (valid[..., None].expand(-1, -1, -1, -1, bs).flatten(-2)) & (pos < tk)
    base = (torch.arange(b * hkv, device=q.device) * tk).view(b, hkv, 1, 1)
    flat = (pos.clamp(max=tk - 1) + base).flatten()
    kc = k.reshape(-1, d).index_select(0, flat).view(b, hkv, s, -1, d)
    vc = v.reshape(-1, d).index_select(0, flat).view(b, hkv, s, -1, d)
    qs = q.reshape(b, hkv, s, hq // hkv // s, d)
    out = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=ok[:, :, :, None], scale=scale)
    return out.reshape(b, 1, hq, d), b * hq * kk * bs


def _whole_blocks(q, k, v, p: Pattern, idx, scale):
    """Every slot real (the fixed blocks 0, i-1, i first, as decode_top_k orders them): the complete
    blocks' rows are taken from the cache with one index_select each for K and V, the partial last
    block (when Tk is not a multiple of bs) is appended as it is, and SDPA needs no mask."""
    b, hq, _, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    s = idx.shape[2]
    partial = tk % bs
    if partial:                                      # slot 2 is the diagonal block i = nfull: appended
        idx = torch.cat([idx[..., :2], idx[..., 3:]], -1)
    heads = (torch.arange(b * hkv, device=q.device) * tk).view(b, hkv, 1, 1, 1)
    pos = (heads + idx[..., None] * bs + torch.arange(bs, device=q.device)).view(-1)   # rows of (B*Hkv*Tk, D)

    def gather(x):
        blocks = x.reshape(-1, d).index_select(0, pos).view(b, hkv, s, -1, d)          # (B, Hkv, S, K'*bs, D)
        if partial:
            blocks = torch.cat([blocks, x[:, :, None, tk - partial:].expand(b, hkv, s, partial, d)], 3)
        return blocks

    out = F.scaled_dot_product_attention(q.view(b, hkv, s, hq // hkv // s, d), gather(k), gather(v), scale=scale)
    return out.reshape(b, 1, hq, d)
