"""SparseAttention: cheaper attention patterns swapped into a frozen causal LM, as one registered
attention function (transformers' AttentionInterface), like FactorizedAttention.

    plugin = SparseAttention(SparseConfig(variant="learned", block_size=64, top_k=4)).attach(model)
    plugin.collect_gate_loss = True            # distil the gates from the dense attention
    loss = lm_loss + plugin.gate_loss()        # the gates learn only from this term
    plugin.sparsity()                          # fraction of causal (query, key) pairs skipped

Variants (per patched layer; the other layers stay dense):
  window     each query sees the last `window` keys (itself included) plus the first `sinks` keys.
  learned    block-sparse attention with a learned, causal block selector (below).
  performer  FAVOR+ causal linear attention (positive random features, fixed seed, a buffer).
  dense      the base kernel itself: the reference for benchmarking the harness.

Everything runs after rotary embeddings and the KV cache, so one implementation serves GPT-2 and
the Llama family. The function receives q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) with Tk >= Tq:
the queries are the LAST Tq of the Tk key positions (a dynamic KV cache; static caches, whose key
slots run past the queries, are not supported). Grouped-query heads are never repeated for the
softmax kernels: the G query heads of one kv head are folded into the query rows.

The pattern is defined on key indices (cache slots), so it is exact for right padding (a padded row
computes what the sequence alone computes) but left padding shifts block boundaries and sinks.
The model's padding/causal mask (bool or additive float 4D, or None for plain causal) is always
applied on top of the pattern. A query that sees no key at all (a padding row outside the window,
an all-padding batch) outputs zeros, which is what SDPA does; the eager kernel would instead
average every value there. Only padding rows are ever affected. Attention dropout is not applied by
the sparse kernels (the frozen base runs in eval mode).

Kernels for window/learned, all computing the same function:
  masked   dense SDPA with the pattern as a boolean (Tq, Tk) mask: the reference, no savings.
  gather   pure torch, no compile: per query block, gather only its kept key blocks
           (index, then SDPA on (B*Hkv, n_query_blocks, G*block, kept*block)). Memory and work are
           O(T * kept * block) instead of O(T^2); window keeps ceil((window-1)/block)+1 blocks.
  flex     torch FlexAttention with a BlockMask built from the kept blocks (compiled once, lazily;
           compiled kernels are cached in $TORCHINDUCTOR_CACHE_DIR, default $ATTNLAB_CACHE/inductor).
  auto     gather on CPU, flex on CUDA.
Performer has its own chunked causal linear-attention kernel (quadratic within a chunk of
`block_size` queries, a running (features x D) state across chunks; memory O(T * features)), used
for every kernel setting but "masked", which materialises the normalised (Tq, Tk) weights instead.

The learned selector, and why it is causal. SeerAttention pools the QUERIES of a block to pick its
key blocks; the pooled query of block i contains tokens after position p, so the choice for p would
depend on the future and generation with a KV cache (which has not seen them) would differ from a
full forward. Here, for query block i (positions [i*b, (i+1)*b)):
  always kept   key block i (the diagonal, causal inside), i-1 (local) and 0 (sink);
  candidates    key blocks 1 <= j <= i-2, scored per kv head h by
                    s_h(i, j) = (Wq kpool_{i-1,h}) . (Wk kpool_{j,h}) / sqrt(gate_dim)
                where kpool_j is the mean key of block j. Block i-1 stands in for block i's queries:
                it is complete and in the past for every query of block i;
  selected      the top_k candidates, or those whose softmax probability >= threshold.
Only complete key blocks before block i are pooled, so a decoding step (Tq=1) scores exactly the
keys the full forward scored. The selection is per kv head, shared by its G query heads. Wq, Wk
(head_dim -> gate_dim, shared across heads, one pair per layer) start equal and random, so the
initial score is a similarity of pooled keys. The hard top-k passes no gradient: the gates learn
only from gate_loss(), SeerAttention-style distillation: KL(teacher || gate) where the teacher is
the dense attention of the same q, k summed into (query block, key block) mass over the candidate
blocks (computed under no_grad, chunked over query blocks). The gates read detached keys, so that
loss reaches the gate parameters only.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import inner_attention, modules_to_patch, names, register, route, unroute
from .base import Plugin, PluginError

NAME = "attnlab_sparse"
NAMES = names(NAME)        # one per inner kernel: each gets its mask format
ATTR = "attnlab_sparse"
LABEL = "SparseAttention"
VARIANTS = ("window", "learned", "performer", "dense")
KERNELS = ("auto", "flex", "gather", "masked")
TEACHER_ROWS = 256   # query rows per chunk of the teacher's dense attention (memory ~ rows * Tk)


@dataclass
class SparseConfig:
    variant: str = "learned"             # window | learned | performer | dense
    layers: list[int] | None = None      # None: every layer
    kernel: str = "auto"                 # auto | flex | gather | masked
    window: int = 10                     # window: keys seen per query, itself included
    sinks: int = 0                       # window: the first `sinks` keys are always seen
    block_size: int = 64                 # learned: block of the selection; all: tile of gather/flex
    top_k: int = 4                       # learned: selected key blocks per query block, beyond the 3 kept
    threshold: float | None = None       # learned: keep candidates with gate prob >= threshold instead
    gate_dim: int = 32                   # learned: width of Wq, Wk
    features: int = 64                   # performer: random features
    train_modules: list[str] = field(default_factory=list)  # e.g. ["model.layers.5.mlp"]
    # distillation from the dense base (attnlab.distill): per token KL(P_base || P_sparse) plus
    gate_weight: float = 1.0             # x the gates' block-map KL (what trains a learned gate)
    hidden_weight: float = 0.0           # x every layer's hidden-state MSE (intermediate layers)
    oracle: bool = False                 # learned: select by the dense attention's true block mass
                                         # instead of the gate (an upper bound for any gate at this
                                         # top_k; O(T^2) and it sees a block's later queries: analysis only)
    metric_examples: int = 2             # eval examples for attention MSE and gradient cosine (O(T^2); 0: skip)

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.variant not in VARIANTS:
            raise PluginError(f"unknown sparse variant '{self.variant}'; use one of: {', '.join(VARIANTS)}")
        if self.kernel not in KERNELS:
            raise PluginError(f"unknown sparse kernel '{self.kernel}'; use one of: {', '.join(KERNELS)}")
        for name, low in (("window", 1), ("sinks", 0), ("block_size", 1), ("top_k", 0), ("gate_dim", 1),
                          ("features", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise PluginError(f"sparse option {name} must be an integer >= {low}, got {value!r}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise PluginError(f"sparse option threshold must be in (0, 1] (or None for top_k), got {self.threshold}")


# --- the pattern ---------------------------------------------------------------------------------

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


# --- kernels -------------------------------------------------------------------------------------

def group_queries(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, Hq, T, D) -> (B, Hkv, G*T, D): the G query heads of a kv head as extra rows (no kv repeat)."""
    b, hq, t, d = q.shape
    return q.reshape(b, hkv, (hq // hkv) * t, d)


def group_mask(mask: torch.Tensor, b: int, hkv: int, g: int) -> torch.Tensor:
    """(B|1, Hkv|1, Tq, Tk) -> (B, Hkv, G*Tq, Tk), matching group_queries."""
    tq, tk = mask.shape[-2:]
    return mask.unsqueeze(2).expand(b, hkv, g, tq, tk).reshape(b, hkv, g * tq, tk)


def safe_sdpa(q, k, v, allowed, scale):
    """SDPA with a boolean mask where a row with no visible key outputs 0 (and gets no NaN gradient)."""
    has = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has, scale=scale)
    return out.masked_fill(~has, 0.0)


def masked_attention(q, k, v, allowed, scale):
    """Reference: dense SDPA over (Tq, Tk) with the pattern as a mask. Returns (B, Tq, Hq, D)."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    out = safe_sdpa(group_queries(q, hkv), k, v, group_mask(allowed, b, hkv, hq // hkv), scale)
    return out.reshape(b, hq, tq, d).transpose(1, 2).contiguous()


def kept_order(keep: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept key blocks first, `most` per query block, and whether each slot is real."""
    order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :most]
    return order, keep.gather(-1, order)


def gather_attention(q, k, v, p: Pattern, keep, base, most: int, scale):
    """Block-sparse attention in plain torch: each query block attends to its kept key blocks only,
    gathered into a (most * bs)-long key set. Returns (B, Tq, Hq, D)."""
    b, hq, tq, d = q.shape
    hkv, tk, bs, nq, nb = k.shape[1], k.shape[2], p.bs, p.nq, p.nb
    g, most = hq // hkv, min(most, nb)
    order, real = kept_order(keep.expand(b, hkv, nq, nb), most)           # (B, Hkv, nq, most)

    kb = F.pad(k, (0, 0, 0, nb * bs - tk)).view(b, hkv, nb, bs, d)
    vb = F.pad(v, (0, 0, 0, nb * bs - tk)).view(b, hkv, nb, bs, d)
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = torch.arange(hkv, device=q.device).view(1, hkv, 1, 1)
    kg = kb[bi, hi, order].view(b * hkv, nq, most * bs, d)
    vg = vb[bi, hi, order].view(b * hkv, nq, most * bs, d)

    # Which (query, gathered key) pairs the pattern and the model's mask allow: (B, Hkv, nq, bs, most*bs)
    offs = torch.arange(bs, device=q.device)
    kpos = (order[..., None] * bs + offs).reshape(b, hkv, nq, 1, most * bs)
    qpos = (p.qblocks[:, None] * bs + offs).view(1, 1, nq, bs, 1)
    ok = real.repeat_interleave(bs, dim=-1).unsqueeze(-2) & p.visible(qpos, kpos)
    ok = ok & (qpos >= p.qoff)                                            # rows before the queries are padding
    if base is not None:
        rows = (qpos - p.qoff).clamp(0, tq - 1)
        bidx = bi.view(b, 1, 1, 1, 1) if base.shape[0] == b else torch.zeros_like(bi).view(b, 1, 1, 1, 1)
        ok = ok & base[:, 0][bidx, rows, kpos.clamp(max=tk - 1)]

    # Queries padded to whole blocks, the G heads of a kv head folded into the rows.
    front = p.qoff - p.qb0 * bs
    qp = F.pad(q, (0, 0, front, nq * bs - tq - front)).view(b, hkv, g, nq, bs, d)
    qp = qp.transpose(2, 3).reshape(b * hkv, nq, g * bs, d)
    mask = ok.unsqueeze(3).expand(b, hkv, nq, g, bs, most * bs).reshape(b * hkv, nq, g * bs, most * bs)
    out = safe_sdpa(qp, kg, vg, mask, scale)
    out = out.view(b, hkv, nq, g, bs, d).transpose(2, 3).reshape(b, hq, nq * bs, d)[:, :, front:front + tq]
    return out.transpose(1, 2).contiguous()


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
    from ..backbone import cache_dir

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


def flex_attention_kernel(q, k, v, p: Pattern, keep, base, scale):
    """FlexAttention with a BlockMask of the kept blocks; mask_mod does the token-level rule.
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
        return ok

    if p.qoff == 0:  # query tiles line up with the selection blocks: build the BlockMask from them
        keep_h = keep.repeat_interleave(g, dim=1)
        order = torch.sort(keep_h.to(torch.uint8), dim=-1, descending=True, stable=True).indices
        block_mask = BlockMask.from_kv_blocks(keep_h.sum(-1).to(torch.int32), order.to(torch.int32),
                                              BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(tq, tk))
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


# --- performer -----------------------------------------------------------------------------------

def orthogonal_features(m: int, d: int, seed: int) -> torch.Tensor:
    """(m, d) orthogonal random features with gaussian row norms (FAVOR+), from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range((m + d - 1) // d):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:m]
    return w * torch.randn(m, d, generator=gen).norm(dim=1, keepdim=True)


def performer_features(q, k, w, scale, key_valid):
    """Positive random features phi(x) = exp(w.x - |x|^2/2), x scaled so phi(q).phi(k) estimates
    exp(scale * q.k). Each query row is divided by its own max and all keys by one shared max
    (detached): both cancel in the normalised ratio and keep exp() finite."""
    root = scale ** 0.5

    def logits(x):
        x = x * root
        return x @ w.T - (x * x).sum(-1, keepdim=True) / 2

    lq = logits(q)
    qf = torch.exp(lq - lq.amax(-1, keepdim=True).detach())
    lk = logits(k)
    valid = key_valid[:, None, :, None] if key_valid is not None else torch.ones_like(lk[:1, :1, :, :1], dtype=torch.bool)
    top = lk.masked_fill(~valid, -math.inf).amax((2, 3), keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    kf = torch.exp((lk - top).masked_fill(~valid, -math.inf))      # padding keys: exactly 0
    return qf, kf


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def safe_divide(num, den):
    return num / torch.where(den > 0, den, torch.ones_like(den))


def performer_chunked(qf, kf, v, chunk: int):
    """Causal linear attention with queries the last Tq of Tk positions: quadratic inside a chunk,
    a running (features x D) state and (features) normaliser across chunks."""
    tq, tk = qf.shape[2], kf.shape[2]
    past = tk - tq
    state = kf[:, :, :past].transpose(-1, -2) @ v[:, :, :past]          # (B, H, m, D)
    norm = kf[:, :, :past].sum(2)                                       # (B, H, m)
    outs = []
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        qc, kc, vc = qf[:, :, c0:c1], kf[:, :, past + c0:past + c1], v[:, :, past + c0:past + c1]
        a = (qc @ kc.transpose(-1, -2)).tril()
        num = a @ vc + qc @ state
        den = a.sum(-1, keepdim=True) + qc @ norm.unsqueeze(-1)
        outs.append(safe_divide(num, den))
        state = state + kc.transpose(-1, -2) @ vc
        norm = norm + kc.sum(2)
    return torch.cat(outs, 2)


def performer_weights(qf, kf):
    """(B, H, Tq, Tk) normalised causal linear-attention weights (the materialised reference)."""
    tq, tk = qf.shape[2], kf.shape[2]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=qf.device).tril(tk - tq)
    a = (qf @ kf.transpose(-1, -2)) * causal
    return safe_divide(a, a.sum(-1, keepdim=True))


# --- the dense teacher ---------------------------------------------------------------------------

def dense_probs(q, k, allowed, scale):
    """(B, Hq, Tq, Tk) softmax probabilities under a boolean mask; rows with no visible key are 0."""
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    s = (group_queries(q, hkv) @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~group_mask(allowed, b, hkv, hq // hkv), -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0).view(b, hq, tq, tk)


@torch.no_grad()
def teacher_block_mass(q, k, p: Pattern, base, scale) -> torch.Tensor:
    """(B, Hkv, nq, nb): the dense attention mass each query block (its real rows and the G query
    heads of a kv head) puts on each key block. Chunked over query blocks: memory ~ TEACHER_ROWS * Tk."""
    b, hq, tq, d = q.shape
    hkv, tk, bs = k.shape[1], k.shape[2], p.bs
    g = hq // hkv
    mass = q.new_zeros(b, hkv, p.nq, p.nb)
    step = max(1, TEACHER_ROWS // (bs * g))
    kpos = torch.arange(tk, device=q.device)
    for c0 in range(0, p.nq, step):
        c1 = min(p.nq, c0 + step)
        lo, hi = max((p.qb0 + c0) * bs, p.qoff), min((p.qb0 + c1) * bs, tk)   # real query positions
        if (p.qb0 + c1 - 1) < 3 or lo >= hi:
            continue                                                         # no candidates yet
        rows = torch.arange(lo, hi, device=q.device)
        allowed = (kpos[None] <= rows[:, None])[None, None]
        if base is not None:   # a padding query (its own key is masked everywhere) teaches nothing
            real = base[:, 0].any(1)[:, rows]
            allowed = allowed & base[:, :, rows - p.qoff] & real[:, None, :, None]
        probs = dense_probs(q[:, :, rows - p.qoff], k, allowed, scale)       # (B, Hq, rows, Tk)
        blocks = F.pad(probs, (0, p.nb * bs - tk)).view(b, hkv, g, len(rows), p.nb, bs).sum((2, 5))
        mass.index_add_(2, rows // bs - p.qb0, blocks)
    return mass


# --- the parameters one attention module carries -------------------------------------------------

class SparseLayer(nn.Module):
    """One patched layer: its config, the learned gate (Wq, Wk) or the performer features, and the
    per-forward outputs the plug-in reads (sparsity, gate loss, captured probabilities)."""

    def __init__(self, config: SparseConfig, head_dim: int, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        if config.variant == "learned":
            gen = torch.Generator().manual_seed(1000 + layer_idx)
            init = torch.randn(config.gate_dim, head_dim, generator=gen) / math.sqrt(head_dim)
            self.wq = nn.Linear(head_dim, config.gate_dim, bias=False)
            self.wk = nn.Linear(head_dim, config.gate_dim, bias=False)
            with torch.no_grad():  # equal at the start: the score is a similarity of pooled keys
                self.wq.weight.copy_(init)
                self.wk.weight.copy_(init)
        if config.variant == "performer":
            self.register_buffer("features", orthogonal_features(config.features, head_dim, 2000 + layer_idx),
                                 persistent=False)
        self.force_dense = False          # dense_reference()
        self.collect_gate_loss = False
        self.capture: dict | None = None  # capture_attention()
        self.last_sparsity: torch.Tensor | None = None
        self.last_gate_loss: torch.Tensor | None = None

    # -- the learned selection --------------------------------------------------------------------
    def select(self, k, p: Pattern, oracle_q=None, base=None, scale=None):
        """keep (B, Hkv, nq, nb) bool, and the gate logits (B, Hkv, nq, nfull) with their candidate
        mask (nq, nfull), or None when no query block has a candidate yet."""
        cfg, bs = self.config, p.bs
        b, hkv, _, d = k.shape
        keep = p.fixed_keep()[None, None].expand(b, hkv, p.nq, p.nb).clone()
        cand = p.candidates()
        if not bool(cand.any()):
            return keep, None, cand
        pooled = k[:, :, :p.nfull * bs].detach().reshape(b, hkv, p.nfull, bs, d).mean(3)
        proxy = pooled[:, :, (p.qblocks - 1).clamp(0, p.nfull - 1)]          # block i-1 for query block i
        logits = self.wq(proxy) @ self.wk(pooled).transpose(-1, -2) / math.sqrt(cfg.gate_dim)
        if oracle_q is not None:  # analysis: choose by the dense attention's own block mass
            mass = teacher_block_mass(oracle_q, k, p, base, scale)[..., :p.nfull]
            logits = mass.clamp_min(torch.finfo(mass.dtype).tiny).log()
        if cfg.threshold is not None:
            chosen = cand & (gate_log_probs(logits, cand).exp() >= cfg.threshold)
        else:
            top = min(cfg.top_k, p.nfull)
            chosen = torch.zeros_like(keep[..., :p.nfull])
            if top > 0:
                idx = logits.masked_fill(~cand, -math.inf).topk(top, dim=-1).indices
                chosen = chosen.scatter(-1, idx, True) & cand
        keep[..., :p.nfull] |= chosen
        return keep, logits, cand

    def most_kept(self, p: Pattern, keep) -> int:
        """An upper bound on kept blocks per query block, static when possible (no device sync)."""
        cfg = self.config
        if cfg.variant == "window":
            return -(-(cfg.window - 1) // p.bs) + 1 + -(-cfg.sinks // p.bs)
        if cfg.threshold is None:
            return 3 + cfg.top_k
        return int(keep.sum(-1).max())

    # -- the forward --------------------------------------------------------------------------------
    def forward(self, q, k, v, attention_mask, scale):
        cfg = self.config
        k, v, base = normalise_mask(q, k, v, attention_mask)
        window = cfg.window if cfg.variant == "window" else None
        p = Pattern(q.shape[2], k.shape[2], cfg.block_size, q.device, window, cfg.sinks)

        if cfg.variant == "performer":
            return self.performer(q, k, v, p, base, scale)

        logits = cand = None
        if cfg.variant == "window":
            keep = p.window_keep()
        else:
            keep, logits, cand = self.select(k, p, q if cfg.oracle else None, base, scale)
        kernel = cfg.kernel if cfg.kernel != "auto" else ("flex" if q.device.type == "cuda" else "gather")
        if kernel == "masked":
            out = masked_attention(q, k, v, p.full_mask(keep, base), scale)
        elif kernel == "gather":
            out = gather_attention(q, k, v, p, keep, base, self.most_kept(p, keep), scale)
        else:
            out = flex_attention_kernel(q, k, v, p, keep, base, scale)

        kept, total = p.pair_counts(keep)
        self.last_sparsity = 1 - kept / total
        if self.collect_gate_loss and cfg.variant == "learned":
            if logits is None:   # too short for candidates: a zero that still backpropagates
                self.last_gate_loss = self.wq.weight.sum() * 0.0
            else:
                self.last_gate_loss = self.gate_kl(q, k, p, base, logits, cand, scale)
        if self.capture is not None:
            self.capture[self.layer_idx] = (dense_probs(q, k, p.full_mask(keep, base), scale).detach(),
                                            dense_probs(q, k, p.full_mask(None, base), scale).detach())
        return out

    def performer(self, q, k, v, p: Pattern, base, scale):
        key_valid = base[:, 0].any(1) if base is not None else None         # padding keys drop out
        qf, kf = performer_features(q, k, self.features, scale, key_valid)
        g = q.shape[1] // k.shape[1]
        kf, v = repeat_kv(kf, g), repeat_kv(v, g)
        if self.config.kernel == "masked":
            out = performer_weights(qf, kf) @ v
        else:
            out = performer_chunked(qf, kf, v, self.config.block_size)
        self.last_sparsity = q.new_zeros(())   # nothing skipped: every pair is approximated
        if self.capture is not None:
            self.capture[self.layer_idx] = (performer_weights(qf, kf).detach(),
                                            dense_probs(q, k, p.full_mask(None, base), scale).detach())
        return out.transpose(1, 2).contiguous()

    def gate_kl(self, q, k, p: Pattern, base, logits, cand, scale):
        """KL(teacher block distribution || gate softmax) over the candidate blocks, averaged over the
        (batch, kv head, query block) rows that have candidates and real queries."""
        with torch.no_grad():
            mass = teacher_block_mass(q.detach(), k.detach(), p, base, scale)[..., :p.nfull] * cand
            z = mass.sum(-1, keepdim=True)
            rows = (z.squeeze(-1) > 0) & (cand.sum(-1) > 0)
            target = mass / z.clamp_min(torch.finfo(z.dtype).tiny)
        log_gate = gate_log_probs(logits, cand)
        kl = (torch.xlogy(target, target) - target * log_gate).sum(-1)
        return (kl * rows).sum() / rows.sum().clamp_min(1)


def gate_log_probs(logits, cand):
    """log softmax over the candidate blocks. A large finite fill (not -inf) keeps rows without
    candidates finite, so their (zero-weighted) gradients stay finite too."""
    return logits.masked_fill(~cand, -1e9).log_softmax(-1).masked_fill(~cand, 0.0)


# --- the registered attention function -----------------------------------------------------------

def sparse_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the layer's variant where the module is patched, the
    inner kernel everywhere else (and for the dense variant, and inside dense_reference)."""
    layer = getattr(module, ATTR, None)
    if layer is None or layer.force_dense:
        return inner_attention(module)(module, query, key, value, attention_mask, **kwargs)
    if layer.config.variant == "dense":
        out = inner_attention(module)(module, query, key, value, attention_mask, **kwargs)
        layer.last_sparsity = query.new_zeros(())
        if layer.capture is not None:
            k, _, base = normalise_mask(query, key, value, attention_mask)
            p = Pattern(query.shape[2], k.shape[2], 1, query.device)
            probs = dense_probs(query, k, p.full_mask(None, base), _scale(module, query, kwargs)).detach()
            layer.capture[layer.layer_idx] = (probs, probs)
        return out
    return layer(query, key, value, attention_mask, _scale(module, query, kwargs)), None


def _scale(module, query, kwargs):
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else query.shape[-1] ** -0.5


def _sparse_layers(model: nn.Module) -> list[SparseLayer]:
    layers = [getattr(m, ATTR) for m in model.modules() if isinstance(getattr(m, ATTR, None), SparseLayer)]
    if not layers:
        raise PluginError("this model carries no SparseAttention layers; attach SparseAttention first")
    return layers


# --- reference and metric hooks ------------------------------------------------------------------

@contextlib.contextmanager
def dense_reference(model: nn.Module):
    """Inside: every patched layer computes the unmodified base attention (the teacher)."""
    layers = _sparse_layers(model)
    before = [layer.force_dense for layer in layers]
    for layer in layers:
        layer.force_dense = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.force_dense = was


@contextlib.contextmanager
def capture_attention(model: nn.Module):
    """Yields a dict; after a forward inside, dict[layer_idx] = (sparse_probs, dense_probs), both
    (B, Hq, Tq, Tk) float: the variant's effective attention probabilities (zeros where skipped;
    performer: its normalised causal linear-attention weights) and the dense softmax. Patched layers
    only. It materialises Tq x Tk per head: for short sequences (analysis, metrics), not for speed."""
    layers = _sparse_layers(model)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        layer.capture = captured
    try:
        yield captured
    finally:
        for layer in layers:
            layer.capture = None


# --- the plug-in ---------------------------------------------------------------------------------

class SparseAttention(Plugin):
    method = "sparse"
    Config = SparseConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._collect = False
        self._layers: list[SparseLayer] = []

    def _install(self, model):
        cfg = self.config
        cfg.validate()
        mods = modules_to_patch(model, cfg.layers, ATTR, NAMES, LABEL)
        train = self._train_params(model)
        # train_modules are base weights: keep the originals, so that detach restores the base exactly
        self._originals = {n: prm.detach().clone() for n, prm in train.items()}
        register(NAMES, sparse_attention)
        ref = next(model.parameters())
        self._mods = mods
        for m in self._mods:
            m.add_module(ATTR, SparseLayer(cfg, m.head_dim, m.layer_idx).to(ref.device, ref.dtype))
        self._layers = [getattr(m, ATTR) for m in self._mods]
        self.collect_gate_loss = self._collect
        self._train = train
        for prm in train.values():
            prm.requires_grad_(True)
        self._inner = route(model, NAMES)

    def _train_params(self, model) -> dict[str, nn.Parameter]:
        out = {}
        for name in self.config.train_modules:
            try:
                sub = model.get_submodule(name)
            except AttributeError:
                examples = [n for n, _ in model.named_modules() if n.endswith(("mlp", "self_attn", "attn"))][:3]
                raise PluginError(f"train_modules: the model has no submodule '{name}' "
                                  f"(names look like: {', '.join(examples)})") from None
            out.update({f"{name}.{n}": prm for n, prm in sub.named_parameters()})
        return out

    def _remove(self, model):
        for n, prm in self._train.items():
            prm.requires_grad_(False)
            prm.data = self._originals[n]   # a swap, not a copy: the detached state keeps the trained values
        self._originals = {}
        for m in self._mods:
            delattr(m, ATTR)
        self._layers = []
        unroute(model, self._inner)

    def _parameters(self):
        # an oracle selects by the dense attention itself: its gate is never used, so never trained
        out = {} if self.config.oracle else {n: prm for n, prm in self.model.named_parameters() if f".{ATTR}." in n}
        out.update(self._train)
        return out

    # -- the trainer's objective and the run's extra metrics (attnlab.distill) ----------------------
    def objective(self, model, batch):
        from ..distill import distillation_loss
        if self.config.oracle:
            raise PluginError("oracle selection is for analysis only (it sees each block's later queries); "
                              "evaluate it zero-shot with train: {steps: 0}")
        gate = self.config.gate_weight if self.config.variant == "learned" else 0.0
        return distillation_loss(model, self, batch, gate_weight=gate, hidden_weight=self.config.hidden_weight)

    def extra_metrics(self, model, examples, pad_id, batch_size):
        from ..distill import sparse_metrics
        return sparse_metrics(model, self, examples, pad_id, batch_size=1, n_examples=self.config.metric_examples)

    # -- training signal and statistics -----------------------------------------------------------
    @property
    def collect_gate_loss(self) -> bool:
        return self._collect

    @collect_gate_loss.setter
    def collect_gate_loss(self, on: bool) -> None:
        self._collect = bool(on)
        for layer in self._layers:
            layer.collect_gate_loss = self._collect
            layer.last_gate_loss = None

    def gate_loss(self) -> torch.Tensor:
        """Sum over layers of the last forward's gate distillation loss (differentiable), then cleared.
        Zero for variants without gates. Call it once after each forward."""
        if not self._collect:
            raise PluginError("no gate loss is collected; set plugin.collect_gate_loss = True before the forward")
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        losses = [layer.last_gate_loss for layer in self._layers if layer.last_gate_loss is not None]
        for layer in self._layers:
            layer.last_gate_loss = None
        if not losses:
            if self.config.variant == "learned":
                raise PluginError("no gate loss yet: run a forward with collect_gate_loss = True first")
            return next(self.model.parameters()).new_zeros(())
        return torch.stack(losses).sum()

    def layer_sparsity(self) -> dict[int, float]:
        """layer index -> fraction of causal (query, key) pairs skipped in the last forward."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        done = {layer.layer_idx: float(layer.last_sparsity) for layer in self._layers
                if layer.last_sparsity is not None}
        if not done:
            raise PluginError("no forward has run through the sparse layers yet; run one first")
        return done

    def sparsity(self) -> float:
        """Fraction of causal (query, key) pairs skipped in the last forward, averaged over patched
        layers: 0 for dense and performer (it approximates every pair), ~1 - window/T for window.
        Counted on the pattern at token level, ignoring padding; the gather/flex kernels compute whole
        blocks, so their work is (kept blocks * block_size) keys per query."""
        per_layer = self.layer_sparsity()
        return sum(per_layer.values()) / len(per_layer)
