"""Block-sparse attention whose backward keeps only block indices and the log-sum-exp.

Each query tile (qt positions x the G query heads of a kv head = G*qt rows; qt = bs, a query block,
for selections per query block, ROW_TILE positions for per-row selections, so that fewer rows share
a union) computes against U key blocks: the union of the blocks its rows selected (patterns.Selection). Per row, softmax over
the visible keys of those blocks:

    S = scale * q K_u^T + M        M = 0 where the token rule, the row's own selection and the
    o = softmax(S) V_u                  model's mask allow the pair, -inf elsewhere
    lse = log sum exp(S)           (one number per row)

Forward, per chunk of C query tiles (C chosen so that the chunk's gathered K/V and mask stay under
CHUNK_BYTES): gather the chunk's key/value blocks, build its mask, run the fused CPU flash kernel
(aten._scaled_dot_product_flash_attention_for_cpu), which returns o and lse. The autograd graph
keeps q, k, v (alive anyway), o, lse (B, Hq, Tq) and the block indices: no gathered copy, no dense
(rows x keys) mask. Backward, per chunk again: re-gather K/V, rebuild the mask and call the fused
backward, which recomputes P = exp(S - lse) exactly and returns dq, dK_u, dV_u; dK_u, dV_u are
scatter-added into the key positions they came from (a block selected by several query blocks
collects from each). Off the CPU (no fused kernel) the same steps run in plain torch:
    dV_u = P^T do,  dP = do V_u^T,  dS = P * (dP - rowsum(do * o)),  dq = scale dS K_u,  dK_u = scale dS^T q.

Work: every tile scores G*qt x U*bs pairs (masked ones included), counted in `pairs_scored`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .patterns import Pattern, Selection, scatter_blocks

CHUNK_BYTES = 8 * 2**20      # transients per chunk of query blocks: gathered K/V, mask, per-head dK/dV
USE_FUSED = True             # tests switch this off to check the plain-torch path against the fused one
ROW_TILE = 16                # query positions per tile for per-row selections (when it divides block_size)


@dataclass
class Plan:
    p: Pattern
    sel: Selection
    blocks: torch.Tensor         # (B|1, Hkv|1, nt, U) long: key blocks per query tile
    bvalid: torch.Tensor         # (B|1, Hkv|1, nt, U) bool
    base: torch.Tensor | None    # (B|1, 1, tq, tk) bool: the model's mask
    scale: float
    groups: int
    chunk: int                   # query tiles per chunk
    bank: torch.Tensor           # (far + 2, nsink + 1, bs, bs) additive masks of a (query, key) block pair
    qt: int                      # query positions per tile (divides bs)
    t0: int                      # the first tile: positions [t0*qt, (t0+1)*qt)
    nt: int                      # tiles


def block_sparse_attention(q, k, v, p: Pattern, sel: Selection, base, scale) -> tuple[torch.Tensor, int]:
    """q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) -> (B, Tq, Hq, D), and the pairs the kernel scored."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    qt = ROW_TILE if not sel.per_block and ROW_TILE < p.bs and p.bs % ROW_TILE == 0 else p.bs
    blocks, bvalid = p.union(sel, qt)              # (B|1, Hkv|1, nt, U): shared when the pattern is
    nt, u = blocks.shape[-2:]
    s = 1 if sel.per_block else sel.idx.shape[2]
    per_tile = u * p.bs * (2 * d * 4 + qt * s * 5 + 2 * hq // hkv * d * 4)   # bytes per query tile
    plan = Plan(p, sel, blocks, bvalid, base, scale, hq // hkv, max(1, CHUNK_BYTES // per_tile), _bank(p, q.dtype),
                qt, p.qoff // qt, nt)
    out = BlockSparse.apply(q, k, v, plan)
    return out, b * hq * nt * qt * u * p.bs


def _fused(q) -> bool:
    return USE_FUSED and q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _tiles(plan: Plan, b: int, hkv: int):
    """(c0, c1, bi, hi, mask) for every chunk of query tiles and (batch, kv head); the mask is
    built once per chunk when every head shares the pattern."""
    for c0 in range(0, plan.nt, plan.chunk):
        c1 = min(plan.nt, c0 + plan.chunk)
        shared = None
        for bi in range(b):
            for hi in range(hkv):
                if shared is None or plan.base is not None or not plan.sel.per_block \
                        or plan.blocks.shape[0] * plan.blocks.shape[1] > 1:
                    shared = _mask(plan, bi, hi, c0, c1)
                yield c0, c1, bi, hi, shared


class BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan):
        b, hq, tq, d = q.shape
        hkv, g = k.shape[1], plan.groups
        out = q.new_empty(b, tq, hq, d)
        lse = q.new_empty(b, hq, tq)
        kb, vb = _blocked(k, plan.p), _blocked(v, plan.p)
        for c0, c1, bi, hi, mask in _tiles(plan, b, hkv):
            flat = _flat_blocks(plan, bi, hi, c0, c1)
            qc = _rows(q[bi, hi * g:(hi + 1) * g], plan, c0, c1, 0.0)                 # (C, G, bs, D)
            kc, vc = _gather(kb[bi, hi], flat, c1 - c0), _gather(vb[bi, hi], flat, c1 - c0)
            oc, lc = attend(qc, kc, vc, mask, plan.scale)
            r0, r1, before = _row_range(plan, c0, c1)[:3]
            out[bi, r0:r1, hi * g:(hi + 1) * g] = oc.transpose(1, 2).reshape(-1, g, d)[before:before + r1 - r0]
            lse[bi, hi * g:(hi + 1) * g, r0:r1] = lc.transpose(0, 1).reshape(g, -1)[:, before:before + r1 - r0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        b, hkv, tk, d = k.shape
        g, bs = plan.groups, plan.p.bs
        dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        dkb = torch.zeros(b, hkv, plan.p.nb, bs, d, dtype=k.dtype, device=k.device)
        dvb = torch.zeros_like(dkb)
        kb, vb = _blocked(k, plan.p), _blocked(v, plan.p)
        for c0, c1, bi, hi, mask in _tiles(plan, b, hkv):
            heads = slice(hi * g, (hi + 1) * g)
            flat = _flat_blocks(plan, bi, hi, c0, c1)
            qc = _rows(q[bi, heads], plan, c0, c1, 0.0)
            kc, vc = _gather(kb[bi, hi], flat, c1 - c0), _gather(vb[bi, hi], flat, c1 - c0)
            doc = _rows(dout[bi, :, heads].transpose(0, 1), plan, c0, c1, 0.0)
            oc = _rows(out[bi, :, heads].transpose(0, 1), plan, c0, c1, 0.0)
            lc = _rows(lse[bi, heads, :, None], plan, c0, c1, torch.inf)[..., 0]
            dqc, dkc, dvc = attend_backward(doc, qc, kc, vc, oc, lc, mask, plan.scale)
            r0, r1, before = _row_range(plan, c0, c1)[:3]
            dq[bi, heads, r0:r1] += dqc.transpose(0, 1).reshape(g, -1, d)[:, before:before + r1 - r0]
            dkb[bi, hi].index_add_(0, flat, dkc.sum(1).reshape(-1, bs, d))   # a block may serve several query blocks
            dvb[bi, hi].index_add_(0, flat, dvc.sum(1).reshape(-1, bs, d))
        return dq, dkb.view(b, hkv, -1, d)[:, :, :tk], dvb.view(b, hkv, -1, d)[:, :, :tk], None


# --- one tile: a chunk of query blocks of one (batch, kv head) -------------------------------------

def _bank(p: Pattern, dtype) -> torch.Tensor:
    """(far + 2, nsink + 1, bs, bs): the additive mask (0 or -inf) between query block i and key
    block j by the token rule, for the distances i - j = 0 .. far (every farther block looks like
    `far`: fully visible without a window, outside it with one), then a padding slot (all -inf);
    per sink block j < nsink, then for a block without sinks."""
    bs = p.bs
    nsink = -(-p.sinks // bs) if p.window is not None else 0
    far = -(-(p.window - 1) // bs) + 1 if p.window is not None else 1
    d = torch.arange(far + 1, device=p.device).view(-1, 1, 1, 1)
    js = torch.arange(nsink + 1, device=p.device).view(1, -1, 1, 1)
    r = torch.arange(bs, device=p.device).view(1, 1, bs, 1)
    c = torch.arange(bs, device=p.device).view(1, 1, 1, bs)
    ok = c <= d * bs + r                                                    # causal
    if p.window is not None:
        ok = ok & ((d * bs + r - c < p.window) | ((js < nsink) & (js * bs + c < p.sinks)))
    ok = torch.cat([ok.expand(far + 1, nsink + 1, bs, bs), torch.zeros_like(ok[:1]).expand(1, nsink + 1, bs, bs)])
    return torch.zeros(ok.shape, dtype=dtype, device=p.device).masked_fill_(~ok, -torch.inf)


def _blocked(x, p: Pattern) -> torch.Tensor:
    """(B, Hkv, Tk, D) -> (B, Hkv, nb, bs, D), zero-padded to whole blocks."""
    b, h, tk, d = x.shape
    return F.pad(x, (0, 0, 0, p.nb * p.bs - tk)).view(b, h, p.nb, p.bs, d)


def _flat_blocks(plan: Plan, bi: int, hi: int, c0: int, c1: int) -> torch.Tensor:
    blocks = plan.blocks[min(bi, plan.blocks.shape[0] - 1), min(hi, plan.blocks.shape[1] - 1)]
    return blocks[c0:c1].flatten()


def _gather(xb, flat, c: int) -> torch.Tensor:
    """(nb, bs, D) blocks -> (C, 1, U*bs, D): the listed blocks of each of the C query blocks."""
    return xb.index_select(0, flat).view(c, 1, -1, xb.shape[-1])


def _row_range(plan: Plan, c0: int, c1: int) -> tuple[int, int, int, int]:
    """Real query rows [r0, r1) of query tiles c0..c1, and the padding before/after them."""
    front = plan.p.qoff - plan.t0 * plan.qt
    lo, hi = c0 * plan.qt - front, c1 * plan.qt - front
    r0, r1 = max(lo, 0), min(hi, plan.p.tq)
    return r0, r1, r0 - lo, hi - r1


def _rows(x, plan: Plan, c0: int, c1: int, fill) -> torch.Tensor:
    """x (G, Tq, E) -> (C, G, qt, E): the rows of query tiles c0..c1 (a view unless padded)."""
    g, tq, e = x.shape
    r0, r1, before, after = _row_range(plan, c0, c1)
    rows = x[:, r0:r1]
    if before or after:
        rows = F.pad(rows, (0, 0, before, after), value=fill)
    return rows.reshape(g, c1 - c0, plan.qt, e).transpose(0, 1)


def _mask(plan: Plan, bi: int, hi: int, c0: int, c1: int) -> torch.Tensor:
    """The additive mask (C, 1 or S, qt, U*bs) of one chunk of tiles: the token rule between each
    tile's rows and its gathered blocks, each row's own selection, and the model's mask."""
    p = plan.p
    bs, qt, c = p.bs, plan.qt, c1 - c0
    sb, sh = min(bi, plan.blocks.shape[0] - 1), min(hi, plan.blocks.shape[1] - 1)
    blocks, bvalid = plan.blocks[sb, sh, c0:c1], plan.bvalid[sb, sh, c0:c1]              # (C, U)
    u = blocks.shape[-1]
    start = (plan.t0 + c0 + torch.arange(c, device=blocks.device)) * qt                  # each tile's first position
    i = (start // bs)[:, None]                                                          # its query block
    far = plan.bank.shape[0] - 2
    dist = torch.where(bvalid, (i - blocks).clamp(0, far), far + 1)
    sink = blocks.clamp(max=plan.bank.shape[1] - 1)
    r = (start % bs)[:, None] + torch.arange(qt, device=blocks.device)                  # (C, qt) rows in the block
    mask = plan.bank[dist[:, None, :], sink[:, None, :], r[:, :, None]].view(c, 1, qt, u * bs)   # token rule
    if not plan.sel.per_block:                                                              # each row's own blocks
        rows = _row_blocks(plan, bi, hi, blocks, c0, c1)                                    # (C, S, qt, U)
        extra = torch.zeros(rows.shape, dtype=mask.dtype, device=mask.device).masked_fill_(~rows, -torch.inf)
        mask = mask + extra.repeat_interleave(bs, -1).view(c, rows.shape[1], qt, u * bs)
    if plan.base is not None:
        kpos = (blocks[..., None] * bs + torch.arange(bs, device=blocks.device)).view(c, 1, u * bs).clamp(max=p.tk - 1)
        qrow = (start[:, None, None] + torch.arange(qt, device=blocks.device).view(1, qt, 1) - p.qoff).clamp(0, p.tq - 1)
        ok = plan.base[min(bi, plan.base.shape[0] - 1), 0][qrow, kpos]                     # (C, qt, U*bs)
        mask = mask + torch.zeros(ok.shape, dtype=mask.dtype, device=mask.device).masked_fill_(
            ~ok, -torch.inf).view(c, 1, qt, u * bs)
    return mask


def _row_blocks(plan: Plan, bi: int, hi: int, blocks, c0: int, c1: int) -> torch.Tensor:
    """(C, S, qt, U) bool: whether each row of the tiles selected each of its tile's blocks."""
    p, sel, qt = plan.p, plan.sel, plan.qt
    c, u = blocks.shape
    r0, r1, before, after = _row_range(plan, c0, c1)
    rows = Selection(sel.idx[bi, hi, :, r0:r1], sel.valid[bi, hi, :, r0:r1], per_block=False)
    hit = F.pad(scatter_blocks(rows, p.nb), (0, 0, before, after))                       # (S, C*qt, nb)
    s = hit.shape[0]
    hit = hit.view(s, c, qt, p.nb).transpose(0, 1)                                       # (C, S, qt, nb)
    return hit.gather(-1, blocks.view(c, 1, 1, u).expand(c, s, qt, u))


# --- one chunk: the fused CPU flash kernel, or the same in plain torch ---------------------------

def attend(q, k, v, mask, scale):
    """q (N, G, R, D) against k, v (N, 1, C, D) (shared by the G heads) with an additive mask
    broadcastable to (N, G, R, C) -> o (N, G, R, D), lse (N, G, R)."""
    if _fused(q):
        g = q.shape[1]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.expand(-1, g, -1, -1), v.expand(-1, g, -1, -1), 0.0, False, attn_mask=mask, scale=scale)
    return _attend(q, k, v, mask, scale)


def attend_backward(do, q, k, v, o, lse, mask, scale):
    """The gradients dq (N, G, R, D), dk, dv (N, G, C, D) of attend(), from its o and lse."""
    if _fused(q):
        g = q.shape[1]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k.expand(-1, g, -1, -1), v.expand(-1, g, -1, -1), o, lse, 0.0, False, attn_mask=mask, scale=scale)
    return _attend_backward(do, q, k, v, o, lse, mask, scale)

def _attend(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale + mask
    lse = torch.logsumexp(s, -1)
    seen = torch.isfinite(lse)
    p = torch.exp(s - torch.where(seen, lse, 0.0)[..., None])
    return (p @ v).masked_fill(~seen[..., None], 0.0), torch.where(seen, lse, torch.inf)


def _attend_backward(do, q, k, v, o, lse, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale + mask
    p = torch.exp(s - lse[..., None])
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv
