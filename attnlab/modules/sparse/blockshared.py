"""The block-shared kernel: every row of a query block attends to the same gathered key blocks.

With one selection per (query block i, kv head h) (selection.py, granularity: block), the keys of
query block i are the concatenation of its n_i selected blocks, the diagonal block i last:

    K_i = [K_{j_1}; ...; K_{j_{n-1}}; K_i]   (n_i * bs, D)        Q_i = the bs rows x G heads of i
    S_i = scale * Q_i K_i^T + M                M = 0, except -inf above the diagonal of the last
    O_i = softmax(S_i) V_i,  lse_i = logsumexp(S_i)       block (causal) and on padding slots

Query blocks are processed in chunks of C consecutive blocks for all (batch, kv head) at once: the
chunk's K/V are gathered into one batched tensor (B * Hkv * C, U_c * bs, D), U_c = the largest n_i
in the chunk (padded to the chunk's own union, never the global maximum; slots of a block with
fewer than U_c are masked), and one fused CPU flash-attention call computes the chunk. A row
therefore scores exactly n_i * bs keys: work = density (up to the causal half of the diagonal
block and the padding of the first chunk, where blocks have fewer predecessors). When the chunk
has no padding the mask is one (bs, U_c * bs) tile shared by every block (broadcast).

Backward (custom autograd, memory-lean like blocksparse.py): the forward keeps q, k, v, the output
(the tensors SDPA keeps), the log-sum-exp (B, Hkv, nq, G, bs) and the block indices; per chunk the
backward re-gathers K/V and calls the fused backward, which recomputes P = exp(S - lse), and
scatter-adds dK, dV into the blocks they came from (a block serves several query blocks).

Scope: per-block selections, queries aligned to blocks (qoff % bs == 0) and no model mask (plain
causal); anything else runs the general gather kernel (blocksparse.py), which computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocksparse import _blocked, attend, attend_backward
from .patterns import Pattern, Selection

CHUNK_BYTES = 16 * 2**20     # gathered K/V (and a mask when padded) per chunk of query blocks
WASTE = 1.1                  # a chunk's padded slots / its blocks' selected slots, at most


@dataclass
class Shared:
    p: Pattern
    idx: torch.Tensor        # (B, Hkv, nq, K) long: each query block's blocks, padding first, diagonal last
    valid: torch.Tensor      # (B, Hkv, nq, K) bool
    chunks: list             # [(c0, c1, U)]: query blocks [c0, c1) padded to U key blocks
    scale: float
    groups: int


def supported(p: Pattern, sel: Selection, base) -> bool:
    """Whether this kernel applies: a per-block selection, queries aligned to blocks, no model mask."""
    return sel.per_block and base is None and p.qoff % p.bs == 0


def plan(q, k, p: Pattern, sel: Selection, scale: float) -> Shared:
    """Each query block's blocks ordered padding first, diagonal last, and the chunks of query blocks."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    idx = sel.idx[:, :, 0].expand(b, hkv, -1, -1)                      # (B, Hkv, nq, K)
    valid = sel.valid[:, :, 0].expand(b, hkv, -1, -1)
    diag = idx == p.qblocks[:, None]
    rank = torch.where(valid, 1 + diag.to(torch.long), 0)              # padding 0, chosen 1, diagonal 2
    order = torch.sort(rank, dim=-1, stable=True).indices
    idx, valid = idx.gather(-1, order), valid.gather(-1, order)
    count = valid.sum(-1).amax(1).amax(0).tolist()                     # (nq,): blocks per query block
    per_block = b * hkv * 2 * p.bs * d * q.element_size()             # K and V bytes per gathered block
    chunks, c0 = [], 0
    while c0 < p.nq:   # grow a chunk while it fits and padding to its largest block adds <= WASTE
        c1, most, real = c0 + 1, int(count[c0]), int(count[c0])
        while c1 < p.nq:
            wider, more = max(most, int(count[c1])), real + int(count[c1])
            if (c1 + 1 - c0) * wider * per_block > CHUNK_BYTES or (c1 + 1 - c0) * wider > WASTE * more:
                break
            c1, most, real = c1 + 1, wider, more
        chunks.append((c0, c1, most))
        c0 = c1
    return Shared(p, idx, valid, chunks, scale, hq // hkv)


def block_shared_attention(q, k, v, p: Pattern, sel: Selection, scale: float) -> tuple[torch.Tensor, int]:
    """q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) -> (B, Tq, Hq, D), and the pairs the kernel scored."""
    sh = plan(q, k, p, sel, scale)
    out = BlockShared.apply(q, k, v, sh)
    pairs = q.shape[0] * q.shape[1] * sum((c1 - c0) * p.bs * u * p.bs for c0, c1, u in sh.chunks)
    return out, pairs


def _tail(sh: Shared, u: int, valid, dtype, device) -> torch.Tensor:
    """The additive mask of a chunk: (1, 1, bs, U*bs) causal on the last (diagonal) block, or
    (B*Hkv*C, 1, bs, U*bs) when some slots are padding."""
    bs = sh.p.bs
    r = torch.arange(bs, device=device)
    tail = torch.zeros(bs, u * bs, dtype=dtype, device=device)
    tail[:, (u - 1) * bs:].masked_fill_(r[None, :] > r[:, None], -torch.inf)
    tail = tail[None, None]
    if bool(valid.all()):
        return tail
    cols = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill_(~valid, -torch.inf)
    return tail + cols.reshape(-1, 1, 1, u).repeat_interleave(bs, -1)


def _chunk(sh: Shared, c0: int, c1: int, u: int):
    """The chunk's flat block indices into (B*Hkv*nb) blocks and its valid slots (B*Hkv*C, U)."""
    b, hkv = sh.idx.shape[:2]
    idx = sh.idx[:, :, c0:c1, -u:]
    base = (torch.arange(b * hkv, device=idx.device) * sh.p.nb).view(b, hkv, 1, 1)
    return (idx + base).flatten(), sh.valid[:, :, c0:c1, -u:].reshape(-1, u)


def _qrows(x, sh: Shared, c0: int, c1: int):
    """x (B, Hq, nq*bs, E) -> (B*Hkv*C, G, bs, E): the rows of query blocks c0..c1."""
    b, hq, _, e = x.shape
    hkv, bs = hq // sh.groups, sh.p.bs
    rows = x.view(b, hkv, sh.groups, -1, bs, e)[:, :, :, c0:c1]
    return rows.permute(0, 1, 3, 2, 4, 5).reshape(-1, sh.groups, bs, e)


def _orows(x, sh: Shared, c0: int, c1: int):
    """x (B, nq*bs, Hq, E) -> (B*Hkv*C, G, bs, E)."""
    b, _, hq, e = x.shape
    hkv, bs = hq // sh.groups, sh.p.bs
    rows = x.view(b, -1, bs, hkv, sh.groups, e)[:, c0:c1]               # (B, C, bs, Hkv, G, E)
    return rows.permute(0, 3, 1, 4, 2, 5).reshape(-1, sh.groups, bs, e)


def _pad_rows(x, n: int, dim: int):
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


class BlockShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sh: Shared):
        b, hq, tq, d = q.shape
        hkv, g, bs, nq = k.shape[1], sh.groups, sh.p.bs, sh.p.nq
        qp = _pad_rows(q, nq * bs, 2)
        kb = _blocked(k, sh.p).reshape(-1, bs, d)
        vb = _blocked(v, sh.p).reshape(-1, bs, d)
        out = q.new_empty(b, nq * bs, hq, d)
        lse = q.new_empty(b, hkv, nq, g, bs)
        for c0, c1, u in sh.chunks:
            flat, valid = _chunk(sh, c0, c1, u)
            qc = _qrows(qp, sh, c0, c1)                                      # (B*Hkv*C, G, bs, D)
            kc = kb.index_select(0, flat).view(-1, 1, u * bs, d)
            vc = vb.index_select(0, flat).view(-1, 1, u * bs, d)
            mask = _tail(sh, u, valid, q.dtype, q.device)
            oc, lc = attend(qc, kc, vc, mask, sh.scale)
            c = c1 - c0
            out.view(b, nq, bs, hkv, g, d)[:, c0:c1] = oc.view(b, hkv, c, g, bs, d).permute(0, 2, 4, 1, 3, 5)
            lse[:, :, c0:c1] = lc.view(b, hkv, c, g, bs)
        out = out[:, :tq].contiguous() if tq < nq * bs else out
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sh = sh
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        sh = ctx.sh
        b, hq, tq, d = q.shape
        hkv, g, bs, nq = k.shape[1], sh.groups, sh.p.bs, sh.p.nq
        qp = _pad_rows(q, nq * bs, 2)
        op, dop = _pad_rows(out, nq * bs, 1), _pad_rows(dout.contiguous(), nq * bs, 1)
        kb = _blocked(k, sh.p).reshape(-1, bs, d)
        vb = _blocked(v, sh.p).reshape(-1, bs, d)
        dq = torch.zeros(b, hq, nq * bs, d, dtype=q.dtype, device=q.device)
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        for c0, c1, u in sh.chunks:
            flat, valid = _chunk(sh, c0, c1, u)
            qc = _qrows(qp, sh, c0, c1)
            kc = kb.index_select(0, flat).view(-1, 1, u * bs, d)
            vc = vb.index_select(0, flat).view(-1, 1, u * bs, d)
            oc, doc = _orows(op, sh, c0, c1), _orows(dop, sh, c0, c1)
            lc = lse[:, :, c0:c1].reshape(-1, g, bs)
            mask = _tail(sh, u, valid, q.dtype, q.device)
            dqc, dkc, dvc = attend_backward(doc, qc, kc, vc, oc, lc, mask, sh.scale)
            c = c1 - c0
            dq.view(b, hkv, g, nq, bs, d)[:, :, :, c0:c1] = dqc.view(b, hkv, c, g, bs, d).transpose(2, 3)
            dkb.index_add_(0, flat, dkc.sum(1).reshape(-1, bs, d))
            dvb.index_add_(0, flat, dvc.sum(1).reshape(-1, bs, d))
        tk = k.shape[2]
        dk = dkb.view(b, hkv, -1, d)[:, :, :tk]
        dv = dvb.view(b, hkv, -1, d)[:, :, :tk]
        return dq[:, :, :tq], dk, dv, None
