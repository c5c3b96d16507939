"""Cross-entropy over a large vocabulary without keeping more than it must of the N x V logits.

    loss_n = -log( 1/H * sum_h softmax(X_h W_h^T)[n, y_n] )

H = 1 is ordinary cross-entropy of the linear logits X W^T; H > 1 is a mixture of H softmaxes
(a multi-head output distribution). W may have a leading dimension of 1: one table shared by every
head (broadcast, never copied).

Two ways to get the backward's softmax, chosen by size:
  * saved:      the forward keeps the H x N x V scores (when they fit in `save_bytes`), and the
                backward needs one matmul per gradient: the cost of plain F.cross_entropy(F.linear).
  * recomputed: the forward walks the vocabulary in chunks keeping a running log-sum-exp; the
                backward recomputes each chunk's scores instead of storing them, so peak memory is
                O(N x chunk) rather than O(N x V), at the cost of one extra matmul.
A W that needs no gradient (a frozen table) costs no dW matmul at all.

Precision: the matmuls run in W's dtype (a bf16 base's table stays bf16; X is cast to it), every
log-sum-exp, log-probability and gradient coefficient in fp32, outside any autocast.
"""

from __future__ import annotations

import functools
import math

import torch

SAVE_BYTES = 1 << 30    # keep the scores for the backward when H x N x V of them fit in this (N = 5,461 tokens at
                        # V = 49,152: a plain LM-head CE holds its logits and their gradient anyway; recomputing
                        # costs one more V-wide matmul per step)


def _outside_autocast(fn):
    """forward / backward of a Function, run with autocast off on the device of its first tensor."""
    @functools.wraps(fn)
    def run(ctx, first, *rest):
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *rest)
    return run


def _acc(W: torch.Tensor) -> torch.dtype:
    """The dtype of log-sum-exps and gradient sums: fp32, or W's when wider (fp64 in tests)."""
    return torch.promote_types(W.dtype, torch.float32)


class ConcatTable:
    """A frozen table W = [A | B | ...] (column blocks, each (Hw, V, D_i), e.g. views of a base's LM
    head) that is never concatenated: X W^T = sum_i X_i A_i^T. The residual Backward Attention head
    scores against [W_out, b, R] this way, without a copy of the LM head. Never trained."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.widths = [p.shape[-1] for p in parts]
        self.shape = torch.Size((parts[0].shape[0], parts[0].shape[1], sum(self.widths)))
        self.dtype, self.device, self.requires_grad = parts[0].dtype, parts[0].device, False

    def dim(self) -> int:
        return 3

    def _split(self, X):
        return X.split(self.widths, dim=-1)

    def scores(self, X, c0=0, c1=None):          # X (H, N, D) -> X W[:, c0:c1]^T (H, N, len)
        out = None
        for x, p in zip(self._split(X), self.parts):
            s = torch.matmul(x, p[:, c0:c1].transpose(1, 2))
            out = s if out is None else out.add_(s)
        return out

    def rows(self, idx):                          # W[:, idx] (Hw, N, D)
        return torch.cat([p[:, idx] for p in self.parts], -1)

    def times(self, G, c0=0, c1=None):            # G (H, N, len) @ W[:, c0:c1] (H, N, D)
        return torch.cat([torch.matmul(G, p[:, c0:c1]) for p in self.parts], -1)


def _scores(X, W, c0=0, c1=None):
    return W.scores(X, c0, c1) if isinstance(W, ConcatTable) else torch.matmul(X, W[:, c0:c1].transpose(1, 2))


def _rows(W, idx):
    return W.rows(idx) if isinstance(W, ConcatTable) else W[:, idx]


def _times(G, W, c0=0, c1=None):
    return W.times(G, c0, c1) if isinstance(W, ConcatTable) else torch.matmul(G, W[:, c0:c1])


class _MixtureCE(torch.autograd.Function):
    @staticmethod
    @_outside_autocast
    def forward(ctx, X, W, targets, chunk, w_grad_from, save):
        H, N, _ = X.shape
        V = W.shape[1]
        acc = _acc(W)
        if save:
            S = _scores(X, W)                                         # H, N, V (in W's dtype)
            lse = torch.logsumexp(S.to(acc), dim=-1)
        else:
            S = None
            lse = torch.full((H, N), float("-inf"), dtype=acc, device=X.device)
            for c in range(0, V, chunk):
                lse = torch.logaddexp(lse, torch.logsumexp(_scores(X, W, c, c + chunk).to(acc), dim=-1))
        target_logit = (X.to(acc) * _rows(W, targets).to(acc)).sum(-1)  # H, N
        logp_h = target_logit - lse                                   # per-head log-prob of the target
        logp = torch.logsumexp(logp_h, dim=0) - math.log(H)          # mixture log-prob
        table = isinstance(W, ConcatTable)
        ctx.save_for_backward(X, None if table else W, targets, lse, logp_h, logp, S)
        ctx.table = W if table else None
        ctx.chunk, ctx.w_grad_from = chunk, w_grad_from
        return -logp

    @staticmethod
    @_outside_autocast
    def backward(ctx, grad):
        X, W, targets, lse, logp_h, logp, S = ctx.saved_tensors
        W = ctx.table if ctx.table is not None else W
        acc = _acc(W)
        H, Hw, f = X.shape[0], W.shape[0], ctx.w_grad_from  # columns of W before f are frozen
        # d loss / d logits_h[v] = w_h * (p_h[v] - [v == y]), w_h = the head's share of the target's mass
        coef = grad.to(acc)[None] * torch.exp(logp_h - logp[None]) / H   # H, N
        dX = torch.zeros_like(X, dtype=acc) if ctx.needs_input_grad[0] else None
        dW = torch.zeros_like(W, dtype=acc) if ctx.needs_input_grad[1] else None

        def add(G, c, c1):  # G: the softmax part of d loss / d scores for vocabulary rows c..c1 (H, N, len), fp32
            G = G.to(W.dtype)
            if dX is not None:
                dX.add_(_times(G, W, c, c1))
            if dW is not None:
                g = torch.matmul(G.transpose(1, 2), X[..., f:])       # H, len, D - f
                dW[:, c: c + G.shape[-1], f:] += g if Hw == H else g.sum(0, keepdim=True)

        if S is not None:
            add((S.to(acc) - lse[..., None]).exp_().mul_(coef[..., None]), 0, None)
        else:
            for c in range(0, W.shape[1], ctx.chunk):
                G = (_scores(X, W, c, c + ctx.chunk).to(acc) - lse[..., None]).exp_().mul_(coef[..., None])
                add(G, c, c + ctx.chunk)
        if dX is not None:
            dX -= coef[..., None] * _rows(W, targets)
        if dW is not None:
            for h in range(H):
                dW[h if Hw == H else 0, :, f:].index_add_(0, targets, -coef[h, :, None] * X[h, :, f:])
        return (dX.to(X.dtype) if dX is not None else None), (dW.to(W.dtype) if dW is not None else None), \
            None, None, None, None


def mixture_cross_entropy(X: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, chunk: int = 8192,
                          w_grad_from: int = 0, save_bytes: int = SAVE_BYTES) -> torch.Tensor:
    """Per-token loss (N,) of the mixture of softmax(X[h] @ W[h].T) over h.

    X: (H, N, D) features, W: (H, V, D) or (1, V, D) output rows (or a frozen ConcatTable of
    column blocks), targets: (N,) in [0, V). chunk:
    vocabulary rows per step when the scores are recomputed; it need not divide V. The scores are
    kept for the backward when H x N x V of them take at most `save_bytes` (0: always recompute).
    Columns of W before `w_grad_from` are treated as frozen (their gradient is returned as zero, not
    computed). An empty N gives an empty loss."""
    if X.dim() != 3 or W.dim() != 3 or W.shape[0] not in (1, X.shape[0]) or X.shape[2] != W.shape[2]:
        raise ValueError(f"expected X (H, N, D) and W (H or 1, V, D); got {tuple(X.shape)} and {tuple(W.shape)}")
    if targets.shape != (X.shape[1],):
        raise ValueError(f"targets must have shape ({X.shape[1]},), got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if X.shape[1] == 0:
        return X.new_zeros(0, dtype=_acc(W))
    X = X.to(W.dtype)  # the matmuls in the table's dtype (a no-op unless the base is bf16 / fp16)
    save = X.shape[0] * X.shape[1] * W.shape[1] * X.element_size() <= save_bytes
    return _MixtureCE.apply(X, W, targets, chunk, w_grad_from, save)


def mixture_log_probs(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(N, V) log-probabilities of the mixture, materialised: the reference, and what inference uses."""
    X, acc = X.to(W.dtype), _acc(W)
    logp = torch.log_softmax(_scores(X, W).to(acc), dim=-1)                 # H, N, V
    if X.shape[0] == 1:
        return logp[0]
    return torch.logsumexp(logp, dim=0) - math.log(X.shape[0])
