"""The reference and the FlexAttention kernel for the block patterns (the memory-lean `gather`
kernel, the CPU default, is blocksparse.py); all compute the same function:
  masked   dense SDPA with the pattern as a boolean (Tq, Tk) mask: the reference, no savings.
  flex     torch FlexAttention with a BlockMask built from the kept blocks (compiled once, lazily;
           compiled kernels are cached in $TORCHINDUCTOR_CACHE_DIR, default $ATTNLAB_CACHE/inductor).
           Per-row selections (quest, learned): the BlockMask holds each query block's union of
           blocks and mask_mod applies each row's own choice.
Grouped-query heads are never repeated: the G query heads of one kv head are folded into the rows.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..base import PluginError
from .patterns import Pattern

def safe_sdpa(q, k, v, allowed, scale):
    """SDPA with a boolean mask where a row with no visible key outputs 0 (and gets no NaN gradient)."""
    has = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has, scale=scale)
    return out.masked_fill(~has, 0.0)


def masked_attention(q, k, v, allowed, scale):
    """Reference: dense SDPA over (Tq, Tk) with the pattern as a mask; allowed (B|1, Hkv|1, G*Tq, Tk)
    over the G query heads of each kv head (folded into the rows, never repeated). Returns (B, Tq, Hq, D)."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    out = safe_sdpa(q.reshape(b, hkv, -1, d), k, v, allowed, scale)
    return out.reshape(b, hq, tq, d).transpose(1, 2).contiguous()


_FLEX = None


def compiled_flex():
    """torch.compile(flex_attention), once; its kernels are cached on disk across runs."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        use_attnlab_inductor_cache()
        _FLEX = torch.compile(flex_attention)
    return _FLEX


def use_attnlab_inductor_cache() -> None:
    """Point Inductor's on-disk cache at $ATTNLAB_CACHE/inductor unless the user chose one. Torch
    fills TORCHINDUCTOR_CACHE_DIR with its /tmp default when it first needs it (even before any
    compile), so that default counts as unset."""
    from ...backbone import cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # private module moved: only an unset variable counts as unset
        torch_default = None
    if current is None or os.path.abspath(current) == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def static_padded(t: torch.Tensor) -> torch.Tensor:
    """`t` zero-padded on its last two dims to powers of two, marked static for torch.compile."""
    *lead, rows, cols = t.shape
    out = t.new_zeros(*lead, 1 << (rows - 1).bit_length(), 1 << (cols - 1).bit_length())
    out[..., :rows, :cols] = t
    torch._dynamo.mark_static(out)
    return out


def tile_blocks(kept: torch.Tensor, r: int, pool=any) -> torch.Tensor:
    """(..., n, m) kept blocks pooled over r x r into tiles of r blocks (`any` or `all` of them;
    blocks past the edge count as not kept)."""
    if r == 1:
        return kept
    *lead, n, m = kept.shape
    kept = F.pad(kept, (0, -m % r, 0, -n % r))
    tiles = kept.view(*lead, kept.shape[-2] // r, r, kept.shape[-1] // r, r)
    return tiles.any(-1).any(-2) if pool is any else tiles.all(-1).all(-2)


def tile_factor(bs: int, cuda: bool, training: bool) -> int:
    """How many selection blocks one BlockMask tile spans (1 but for CUDA training with bs < 128)."""
    return 128 // bs if cuda and training and bs < 128 and 128 % bs == 0 else 1


def kv_lists(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BlockMask's (num_blocks, indices) of a (B, H, n, m) boolean: the kept blocks first."""
    order = torch.sort(kept.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return kept.sum(-1).to(torch.int32), order.to(torch.int32)


def flex_attention_kernel(q, k, v, p: Pattern, keep, base, scale, rows=None):
    """FlexAttention with a BlockMask of the kept blocks (B|1, Hkv|1, nq, nb); mask_mod does the
    token-level rule and, for per-row selections, each row's own blocks `rows` (B, Hkv, S, Tq, nb).
    Returns (B, Tq, Hq, D)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    b, hq, tq, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    g = hq // hkv
    cuda = q.device.type == "cuda"
    if cuda and bs % 16:
        raise PluginError(f"kernel='flex' on CUDA needs block_size a multiple of 16 (got {bs}); "
                          f"change block_size or use kernel='gather'")
    # mask_mod reads these tensors. Inductor's CPU template miscompiles captured tensors whose shape
    # is dynamic, so they are padded to power-of-two sizes and marked static: a recompile happens
    # only when a size crosses a power of two, not at every new length or decoding step.
    keep = static_padded(keep.expand(b, hkv, p.nq, p.nb))
    base = static_padded(base.expand(b, 1, tq, tk)) if base is not None else None
    per_head = rows is not None and rows.shape[2] > 1
    rows = static_padded(rows.expand(b, hkv, *rows.shape[2:])) if rows is not None else None
    # Tensors, not Python ints, for what changes from call to call: no recompile per decoding step.
    qoff = torch.tensor(p.qoff, device=q.device)
    qb0 = torch.tensor(p.qb0, device=q.device)
    window, sinks = p.window, p.sinks

    def mask_mod(bi, hi, q_idx, kv_idx):
        qpos = q_idx + qoff
        ok = (kv_idx <= qpos) & keep[bi, hi // g, qpos // bs - qb0, kv_idx // bs]
        if window is not None:
            ok = ok & ((qpos - kv_idx < window) | (kv_idx < sinks))
        if base is not None:
            ok = ok & base[bi, 0, q_idx, kv_idx]
        if rows is not None:
            ok = ok & rows[bi, hi // g, hi % g if per_head else 0, q_idx, kv_idx // bs]
        return ok

    if p.qoff == 0:  # query tiles line up with the selection blocks: build the BlockMask from them
        # On CUDA, FlexAttention's backward tiles are 128 wide (sm90, head dim 64..128), and its
        # lowering finds no kernel for a BlockMask of smaller blocks: a training forward gets tiles
        # of 128 (OR of the blocks inside; mask_mod keeps the exact block rule).
        training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        r = tile_factor(bs, cuda, training)
        keep_h = keep.repeat_interleave(g, dim=1)
        any_kept, all_kept = tile_blocks(keep_h, r, any), tile_blocks(keep_h, r, all)
        # A tile strictly below the diagonal whose blocks are all kept needs no mask_mod (a "full"
        # block of the BlockMask); only with no row-, window- or padding rule inside it.
        n = any_kept.shape[-1]
        below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        full = all_kept & below if rows is None and window is None and base is None else torch.zeros_like(all_kept)
        partial = any_kept & ~full
        block_mask = BlockMask.from_kv_blocks(*kv_lists(partial), *kv_lists(full), BLOCK_SIZE=bs * r,
                                              mask_mod=mask_mod, seq_lengths=(tq, tk))
        options = {"BLOCK_M": min(bs, 64), "BLOCK_N": min(bs, 64)} if cuda and bs * r < 128 else None
    else:            # decoding: few queries, evaluate the rule directly
        block_mask = create_block_mask(mask_mod, b, hq, tq, tk, device=q.device, BLOCK_SIZE=128 if cuda else bs)
        options = {"BLOCK_M": min(bs, 64), "BLOCK_N": min(bs, 64)} if cuda and bs < 128 else None
    try:
        out = compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=g > 1,
                              kernel_options=options)
    except PluginError:
        raise
    except Exception as e:  # no compiler, unsupported device or shape
        raise PluginError(f"FlexAttention failed on {q.device.type} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); use kernel='gather'") from e
    return out.transpose(1, 2).contiguous()
