"""Cross-entropy over a large vocabulary without materialising the N x V logits.

    loss_n = -log( 1/H * sum_h softmax(X_h W_h^T)[n, y_n] )

H = 1 is ordinary cross-entropy of the linear logits X W^T; H > 1 is a mixture of H softmaxes
(a multi-head output distribution). The forward pass walks the vocabulary in chunks keeping a
running log-sum-exp; the backward pass recomputes each chunk's logits instead of storing them,
so peak memory is O(N x chunk) rather than O(N x V), at the cost of one extra matmul.
"""

from __future__ import annotations

import math

import torch


class _MixtureCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, targets, chunk, w_grad_from):
        H, N, _ = X.shape
        V = W.shape[1]
        lse = torch.full((H, N), float("-inf"), dtype=X.dtype, device=X.device)
        for c in range(0, V, chunk):
            s = torch.bmm(X, W[:, c: c + chunk].transpose(1, 2))
            lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
        target_logit = (X * W[:, targets]).sum(-1)                  # H, N
        logp_h = target_logit - lse                                   # per-head log-prob of the target
        logp = torch.logsumexp(logp_h, dim=0) - math.log(H)          # mixture log-prob
        ctx.save_for_backward(X, W, targets, lse, logp_h, logp)
        ctx.chunk, ctx.w_grad_from = chunk, w_grad_from
        return -logp

    @staticmethod
    def backward(ctx, grad):
        X, W, targets, lse, logp_h, logp = ctx.saved_tensors
        H = X.shape[0]
        # d loss / d logits_h[v] = w_h * (p_h[v] - [v == y]), w_h = the head's share of the target's mass
        coef = grad[None] * torch.exp(logp_h - logp[None]) / H       # H, N
        dX = torch.zeros_like(X) if ctx.needs_input_grad[0] else None
        dW = torch.zeros_like(W) if ctx.needs_input_grad[1] else None
        V, f = W.shape[1], ctx.w_grad_from  # columns of W before f are frozen: their gradient is skipped
        for c in range(0, V, ctx.chunk):
            Wc = W[:, c: c + ctx.chunk]
            g = torch.exp(torch.bmm(X, Wc.transpose(1, 2)) - lse[..., None]) * coef[..., None]
            if dX is not None:
                dX.baddbmm_(g, Wc)
            if dW is not None:
                dW[:, c: c + ctx.chunk, f:] += torch.bmm(g.transpose(1, 2), X[..., f:])
        if dX is not None:
            dX -= coef[..., None] * W[:, targets]
        if dW is not None:
            for h in range(H):
                dW[h, :, f:].index_add_(0, targets, -coef[h, :, None] * X[h, :, f:])
        return dX, dW, None, None, None


def mixture_cross_entropy(X: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, chunk: int = 8192,
                          w_grad_from: int = 0) -> torch.Tensor:
    """Per-token loss (N,) of the mixture of softmax(X[h] @ W[h].T) over h.

    X: (H, N, D) features, W: (H, V, D) output rows, targets: (N,) in [0, V). chunk: vocabulary rows
    per step; it need not divide V. Columns of W before `w_grad_from` are treated as frozen (their
    gradient is returned as zero, not computed). An empty N gives an empty loss."""
    if X.dim() != 3 or W.dim() != 3 or X.shape[0] != W.shape[0] or X.shape[2] != W.shape[2]:
        raise ValueError(f"expected X (H, N, D) and W (H, V, D); got {tuple(X.shape)} and {tuple(W.shape)}")
    if targets.shape != (X.shape[1],):
        raise ValueError(f"targets must have shape ({X.shape[1]},), got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if X.shape[1] == 0:
        return X.new_zeros(0)
    return _MixtureCE.apply(X, W, targets, chunk, w_grad_from)


def mixture_log_probs(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(N, V) log-probabilities of the mixture, materialised: the reference, and what inference uses."""
    if X.shape[0] == 1:
        return torch.log_softmax(X[0] @ W[0].t(), dim=-1)
    logp = torch.log_softmax(torch.bmm(X, W.transpose(1, 2)), dim=-1)
    return torch.logsumexp(logp, dim=0) - math.log(X.shape[0])
