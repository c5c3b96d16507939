"""The low-rank indexer (variant: lowrank): a selection scored from every key, in r of D dimensions.

Quest and the learned gate score a key block from a summary of it (a box, pooled keys). What a
selection should keep is the block's attention mass, a sum over the block's own keys,

    mass(p, j) = sum_{x in j} exp(q_p . k_x * scale) / Z_p,

and no summary of the block can tell one sharp key from many moderate ones. The indexer (after the
"lightning indexer" of DeepSeek Sparse Attention, and Loki's low-rank keys) computes the logits
themselves, approximately, in r << D dimensions, for every key, and scores each block by its
approximate mass.

Which r dimensions. Per layer and kv head, the logit is the bilinear form q . k (q of any of the G
query heads, after RoPE, as the attention uses them). Replace it by q W k with W of rank r. Over a
query and a key drawn independently from the text (second moments C_q = E[q q^T], C_k = E[k k^T]):

    E[(q (I - W) k)^2] = tr((I - W)^T C_q (I - W) C_k) = || C_q^(1/2) (I - W) C_k^(1/2) ||_F^2,

so (Eckart-Young) the best W makes C_q^(1/2) W C_k^(1/2) the rank-r truncation U_r S_r V_r^T of
M = C_q^(1/2) C_k^(1/2) (its SVD M = U S V^T):

    W = A B^T,   A = C_q^(-1/2) U_r S_r^(1/2)  (D x r),   B = C_k^(-1/2) V_r S_r^(1/2)  (D x r).

Fitted in closed form from the moments of a few dense forward passes (calibrate()): nothing is
trained. With C_q = I it is the PCA of the keys (Loki); the queries' moments matter because a
key direction the queries never read costs nothing to drop.

The score. The approximate logits s(p, x) = (q_p A) . (k_x B) * scale; per row and query head,
block j's score is log sum_{x in j} exp(s(p, x)), the log of its approximate mass up to the row's
normaliser (a row ranks its own blocks, so the normaliser drops out): selection per query head,
as Quest's (granularity row). Cost per row and query head: r multiply-adds and one exponential
per earlier key, against 2 D multiply-adds per kept key for the sparse attention itself (at r = 16,
D = 64, density 1/4: half of it, and the exponentials on top). That is what a decoding step pays
(one row: the keys' projections k B are kept beside the KV cache, pages.py, so a step projects only
the newly completed blocks); rows are scored in chunks of CHUNK.

By that count a row's scores cost less than the attention density 1/4 skips (2 D multiply-adds and
an exponential per skipped key); as implemented (every (row, key) score materialised, several passes
over them) scoring every row of a prefill costs more than the dense attention it saves (the quality
runs' timings, docs/sparse_attention.md). So per query block (granularity block, the prefill
kernel's unit) the block's queries are pooled first. The logit is linear in
the query, so the mean of the block's rows' logits for key x is exactly the pooled query's,
s(qbar_i, x) with qbar_i the mean of the block's (real) rows; the approximation is taking the
softmax of the mean logit for the mean of the rows' softmaxes. Per query head the pooled query's
approximate attention over the keys before the block (every row of block i sees all of them), summed
over each candidate block and over the G heads of the kv head, is the block's score (logged):

    score(i, j) = log sum_g [ sum_{x in j} exp(s_g(qbar_i, x)) / sum_{x < start_i} exp(s_g(qbar_i, x)) ],

nq rows instead of Tq: the cost falls by the block size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import PluginError
from .patterns import Pattern
from .pooling import pool_queries
from .teacher import dense_passes

CHUNK = 256            # query rows scored at once (memory ~ B x Hq x CHUNK x Tk)


class LowRankIndexer(nn.Module):
    """One layer's A, B (Hkv, D, r); zero until fitted (calibrate(), or a saved state loaded)."""

    def __init__(self, head_dim: int, hkv: int, rank: int):
        super().__init__()
        if rank > head_dim:
            raise PluginError(f"sparse option rank {rank} is above the head dimension {head_dim}: use rank <= {head_dim}")
        self.wq = nn.Parameter(torch.zeros(hkv, head_dim, rank), requires_grad=False)
        self.wk = nn.Parameter(torch.zeros(hkv, head_dim, rank), requires_grad=False)

    @property
    def fitted(self) -> bool:
        return bool(self.wk.detach().abs().sum() > 0)

    @torch.no_grad()
    def fit(self, cq: torch.Tensor, ck: torch.Tensor) -> None:
        """A, B from the second moments cq, ck (Hkv, D, D) (the module docstring's W = A B^T)."""
        rank = self.wq.shape[-1]
        hq, hk = _sqrt(cq), _sqrt(ck)
        u, s, vh = torch.linalg.svd(hq @ hk)
        root = s[..., :rank].sqrt()[..., None, :]
        self.wq.copy_((_sqrt(cq, inverse=True) @ u[..., :rank] * root).to(self.wq.dtype))
        self.wk.copy_((_sqrt(ck, inverse=True) @ vh.transpose(-1, -2)[..., :rank] * root).to(self.wk.dtype))

    def project(self, k: torch.Tensor) -> torch.Tensor:
        """Keys (B, Hkv, T, D) -> k B (B, Hkv, T, r)."""
        return torch.einsum("bhtd,hdr->bhtr", k, self.wk)

    @torch.no_grad()
    def scores(self, q, k, p: Pattern, base, scale: float, block: bool, real=None, kp=None) -> torch.Tensor:
        """q (B, Hq, Tq, D), k (B, Hkv, Tk, D) after RoPE -> (B, Hkv, G, Tq, nfull) per row and query
        head, or (B, Hkv, 1, nq, nfull) per query block (module docstring). Only the complete blocks'
        keys are read (every candidate, and every key before a query block, lies in one); kp: their
        projections, kept beside the KV cache (pages.Pages.lowrank_keys), else computed here."""
        if not self.fitted:
            raise PluginError("the lowrank indexer is not fitted: call plugin.calibrate(sequences) (a few dense "
                              "forward passes) or load a saved lowrank state first")
        b, hq, tq, d = q.shape
        hkv = k.shape[1]
        g, nfull, bs = hq // hkv, p.nfull, p.bs
        tk = nfull * bs
        kp = self.project(k[:, :, :tk]) if kp is None else kp                          # (B, Hkv, nfull*bs, r)
        kpos = torch.arange(tk, device=q.device)
        base = None if base is None else base[..., :tk]
        if block:
            qbar = pool_queries(q, p, "mean", real)                                     # (B, Hq, nq, D)
            qp = torch.einsum("bhgtd,hdr->bhgtr", qbar.reshape(b, hkv, g, p.nq, d), self.wq)
            s = (qp @ kp[:, :, None].transpose(-1, -2)) * scale                        # (B, Hkv, G, nq, Tk)
            ok = (kpos[None] < p.qblocks[:, None] * bs)[None, None, None]             # keys before the block
            if base is not None:                                                       # padding keys: none
                ok = ok & base[:, :1].any(2)[:, :, None, None]
            w = s.masked_fill(~ok, -torch.inf).softmax(-1).nan_to_num(0.0)
            mass = w.view(*w.shape[:-1], nfull, bs).sum((-1, 2))                        # (B, Hkv, nq, nfull)
            return mass.clamp_min(torch.finfo(mass.dtype).tiny).log()[:, :, None]
        qp = torch.einsum("bhgtd,hdr->bhgtr", q.reshape(b, hkv, g, tq, d), self.wq)   # (B, Hkv, G, Tq, r)
        out = q.new_full((b, hkv, g, tq, nfull), -torch.inf)
        kt = kp.transpose(-1, -2)                                                      # (B, Hkv, r, Tk)
        for r0 in range(0, tq, CHUNK):
            r1 = min(tq, r0 + CHUNK)
            s = (qp[:, :, :, r0:r1].reshape(b, hkv, -1, qp.shape[-1]) @ kt).view(b, hkv, g, r1 - r0, tk) * scale
            ok = None
            if not (p.tq == 1 and base is None):          # a decoding step sees every complete block whole
                ok = (kpos[None] <= p.qpos[r0:r1, None])[None, None, None]
                if base is not None:
                    ok = ok & base[:, :, r0:r1][:, :, None]
                s = s.masked_fill(~ok, -torch.inf)
            # log sum_{x in j} exp(s): against the row's largest logit (a plain logsumexp over blocks of
            # bs is ~10x slower on the CPU), floored at e^-80 (below it exp gives subnormal floats, which
            # the CPU computes ~50x slower; such a key holds nothing); a row with no visible key stays -inf
            top = s.amax(-1, keepdim=True)
            top = torch.where(top.isfinite(), top, torch.zeros_like(top))
            w = (s - top).clamp_min(-80.0).exp()
            w = w if ok is None else w.masked_fill(~ok, 0.0)
            out[:, :, :, r0:r1] = w.view(b, hkv, g, r1 - r0, nfull, bs).sum(-1).log() + top
        return out


def _sqrt(c: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """C^(1/2) or C^(-1/2) of symmetric positive semi-definite c (..., D, D), in float64; eigenvalues
    below 1e-8 of the largest are raised to it (a direction the text never uses)."""
    e, v = torch.linalg.eigh(c.double())
    e = e.clamp_min(e.amax(-1, keepdim=True) * 1e-8)
    return (v * e.pow(-0.5 if inverse else 0.5)[..., None, :]) @ v.transpose(-1, -2)


class Moments:
    """Accumulates, per patched layer, C_q and C_k (Hkv, D, D) over the real rows and keys of the
    dense forward passes it records (the recorder hook of SparseLayer, as the cached teacher uses)."""

    def __init__(self):
        self.cq: dict[int, torch.Tensor] = {}
        self.ck: dict[int, torch.Tensor] = {}

    def __call__(self, layer, q, k, base, scale, p: Pattern) -> None:
        b, hq, tq, d = q.shape
        hkv = k.shape[1]
        qf, kf = q.detach().double(), k.detach().double()
        if base is not None:                            # padding rows and keys count for nothing
            idx = torch.arange(tq, device=q.device)
            real = base[:, 0, idx, idx + p.qoff]          # (B|1, Tq)
            qf = qf * real[:, None, :, None]
            kf = kf * base[:, 0].any(1)[:, None, :, None]
        qg = qf.reshape(b, hkv, hq // hkv, tq, d).transpose(0, 1).reshape(hkv, -1, d)
        kg = kf.transpose(0, 1).reshape(hkv, -1, d)
        i = layer.layer_idx
        self.cq[i] = self.cq.get(i, 0) + qg.transpose(-1, -2) @ qg
        self.ck[i] = self.ck.get(i, 0) + kg.transpose(-1, -2) @ kg


@torch.no_grad()
def calibrate(model, plugin, sequences) -> dict:
    """Fit every patched layer's indexer from one dense forward per sequence (1-D token tensors);
    returns {'seconds', 'tokens'} of the pass. Fewer keys than the head dimension D leave C_k singular
    (directions no key took, which C_k^(-1/2) would blow up): refused."""
    layers = plugin.layers()
    if any(not hasattr(layer, "indexer") for layer in layers):
        raise PluginError("calibrate fits the lowrank indexer: attach sparse with variant 'lowrank'")
    sequences = _checked(model, list(sequences), layers[0].indexer.wq.shape[1])
    moments = Moments()
    record = dense_passes(model, plugin, sequences, {layer.layer_idx: moments for layer in layers})
    for layer in layers:
        layer.indexer.fit(moments.cq[layer.layer_idx], moments.ck[layer.layer_idx])
    return record


def calibrate_for_timing(model, plugin, tokens: int = 512) -> dict:
    """Fit the indexer on one sequence of random tokens (at most the model's positions): for timings,
    which do not depend on the fit (an unfitted indexer refuses to select). attnlab profile and
    benchmarks/sparse_speed.py use it."""
    from ...backbone import max_positions

    n = min(tokens, max_positions(model) or tokens)
    vocab = model.get_input_embeddings().num_embeddings
    return plugin.calibrate([torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))])


def _checked(model, sequences: list, d: int) -> list:
    """calibrate's sequences, refused in one line naming the fix unless each is a 1-D tensor of the
    model's token ids, within its positions, and together at least d (the head dimension) tokens."""
    from ...backbone import max_positions

    limit, vocab = max_positions(model), model.get_input_embeddings().num_embeddings
    for i, ids in enumerate(sequences):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or not ids.numel():
            what = (f"tensor of shape {tuple(ids.shape)}, {ids.dtype}" if isinstance(ids, torch.Tensor)
                    else type(ids).__name__)
            raise PluginError(f"calibrate: sequence {i} is a {what}; give a list of 1-D tensors of token ids, "
                              f"each at least one token long (one sequence: [ids]; a batch: list(batch))")
        if limit is not None and ids.numel() > limit:
            raise PluginError(f"calibrate: sequence {i} has {ids.numel()} tokens, past the {limit} positions the "
                              f"model reads: cut it to at most {limit}")
        if ids.min() < 0 or ids.max() >= vocab:
            raise PluginError(f"calibrate: sequence {i} holds token ids outside the model's vocabulary 0..{vocab - 1}:"
                              f" tokenize with the backbone's tokenizer")
    if not sequences:
        raise PluginError("calibrate needs at least one sequence of tokens")
    seen = sum(ids.numel() for ids in sequences)
    if seen < d:
        raise PluginError(f"calibrate: {seen} tokens are fewer than the head dimension {d}, so some key directions "
                          f"are never seen: give at least {d} tokens (a few sequences of hundreds is the intended use)")
    return sequences
